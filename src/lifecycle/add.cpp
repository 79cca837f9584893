// lifecycle::add_package — a package manager's install path once the store is file-level: a package
// goes from a staging directory straight into objects/, packages/ and the catalog, verified, without
// a legacy tree (lifecycle.hpp states the contract).
//
// Order, as everywhere: objects and the manifest are staged in temp/, one syncfs makes their bytes
// durable, they are renamed into place and the names made durable (cas::ObjectStore::publish,
// store::PackageIndex::publish: the package's ref last), the staging directory is compared with the
// manifest again (every file re-hashed: a file that changed while it was read fails the add), every
// object the manifest needs is checked to exist with its size, and only then does one catalog
// transaction record the package, verified, its tree `removed`. A stop anywhere before that commit
// leaves the catalog as it was; what was written is unreferenced (gc deletes the objects and the
// manifest; the next locked command's sync drops the ref, since the catalog does not list the package).
// A stop request (util/interrupt.hpp) is honoured until the staged files are published (the add is
// then dropped: staged files deleted, nothing recorded), not after (what is left is short).
#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/ingest/ingest.hpp"
#include "casmig/manifest/manifest.hpp"
#include "casmig/migrate/store_mode.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <optional>
#include <sys/stat.h>
#include <tbb/parallel_for_each.h>
#include <tbb/task_arena.h>
#include <unordered_set>

namespace casmig::lifecycle {

namespace {

/// Files ingested together: their directories stay open (walk::Item::parent) until the group is done,
/// so a group holds at most this many distinct directories and files.
constexpr size_t k_group_files = 512;
constexpr size_t k_group_dirs = 64;

/// The walker's, ingest's and verify's messages speak of migrate and legacy trees; an add's problem
/// names the staging directory and what to do with it instead.
std::string for_add(std::string msg) {
    auto replace = [&](const std::string& from, const std::string& to) {
        for (size_t at = msg.find(from); at != std::string::npos; at = msg.find(from, at + to.size()))
            msg.replace(at, from.size(), to);
    };
    replace("can be migrated: remove it from the package, then run migrate --retry-failed",
            "can be stored: remove it from the staging directory, then add the package again");
    replace("changed while being migrated", "changed while being added");
    replace("rerun migrate --retry-failed once the package is no longer being modified",
            "add the package again once the staging directory is no longer being modified");
    replace("legacy tree", "staging directory");
    return msg;
}

} // namespace

AddResult add_package(store::Store& s, const std::string& name, const std::string& source, unsigned threads,
                      const ProblemSink& problems) {
    const auto started = std::chrono::steady_clock::now();
    const std::string pid = util::printable(name);
    if (!store::is_package_name(name) || name.rfind("store.db", 0) == 0)
        throw util::UsageError("'" + pid + "' cannot be a package id: it must be one directory name, not starting with '.', "
                               "not objects, temp, migration, packages or store.db*");
    s.discover();
    auto& cat = s.catalog();
    if (auto p = cat.package(name))
        throw util::RefusedError("package " + pid + " is already in store " + s.root() + " (" + catalog::to_string(p->state) +
                                 "): add the new version under a new id, or casmig remove it first; the store is unchanged");
    struct stat st {};
    if (::fstatat(s.root_fd(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT)
        throw util::RefusedError("package " + pid + ": " + s.root() + "/" + pid +
                                 " already exists: migrate it as a legacy package, or move it away; the store is unchanged");
    util::Fd src(::open(source.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!src)
        throw util::UsageError("cannot open the staging directory " + source + ": " + std::strerror(errno) +
                               ": give the directory holding the package's files");

    AddResult r;
    auto& objects = s.objects();
    if (auto mode = store::read_compression(cat)) migrate::use_compression(s, *mode);
    // Is a content already in the store? The catalog answers per digest (nothing loaded up front).
    objects.trust_catalog([&cat, m = std::make_shared<std::mutex>()](const hash::Digest& d) {
        std::lock_guard lk(*m);
        return cat.has_object(d);
    });

    // 1. Walk the staging directory (never following a symlink) and stage every file's content.
    std::vector<catalog::Entry> entries;
    std::vector<std::pair<std::string, std::string>> bad; // (path, what)
    std::atomic<std::uint64_t> new_objects{0}, new_bytes{0};
    std::mutex bad_mutex;
    tbb::task_arena arena(static_cast<int>(util::thread_count(threads)));
    std::vector<std::pair<size_t, walk::Item>> group;
    std::unordered_set<const util::Fd*> group_dirs;
    auto flush = [&] {
        arena.execute([&] {
            tbb::parallel_for_each(group.begin(), group.end(), [&](std::pair<size_t, walk::Item>& gi) {
                auto& [idx, it] = gi;
                try {
                    auto ir = ingest::ingest_file(it, &objects, ingest::StoreObject::yes, nullptr);
                    auto& e = entries[idx];
                    e.digest = ir.digest;
                    e.size = ir.size;
                    e.xattrs = std::move(ir.xattrs);
                    if (ir.new_object) {
                        new_objects.fetch_add(1, std::memory_order_relaxed);
                        new_bytes.fetch_add(ir.size, std::memory_order_relaxed);
                    }
                } catch (const walk::PackageError& e) {
                    std::lock_guard lk(bad_mutex);
                    bad.emplace_back(e.path(), e.what());
                }
            });
        });
        group.clear();
        group_dirs.clear();
    };
    std::optional<walk::PackageWalker> walker;
    try {
        walker.emplace(src.get(), ".");
    } catch (const walk::PackageError& e) {
        bad.emplace_back(e.path(), e.what());
    }
    if (walker) try {
        auto& w = *walker;
        walk::Item it;
        for (;;) {
            if (util::stop_requested()) break; // nothing is published yet: the add is dropped below
            try {
                if (!w.next(it)) break;
            } catch (const walk::PackageError& e) {
                bad.emplace_back(e.path(), e.what());
                if (e.path().empty()) break; // the root itself
                continue;
            }
            entries.push_back(it.entry);
            entries.back().xlink.reset(); // links to files outside the staging directory are not the package's
            if (it.entry.type != catalog::EntryType::file) continue;
            ++r.files;
            group_dirs.insert(it.parent.get());
            group.emplace_back(entries.size() - 1, std::move(it));
            it = walk::Item{};
            if (group.size() >= k_group_files || group_dirs.size() >= k_group_dirs) flush();
        }
        if (!util::stop_requested()) flush();
    } catch (...) {
        objects.discard_staged([](const hash::Digest&) { return false; });
        throw;
    }
    if (util::stop_requested()) {
        // A stop request before anything is published: the staged files go, nothing is recorded.
        objects.discard_staged([](const hash::Digest&) { return false; });
        r.interrupted = true;
        r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        return r;
    }
    for (const auto& e : entries)
        if (e.type == catalog::EntryType::file) r.bytes += e.size;
    r.new_objects = new_objects.load();
    r.new_object_bytes = new_bytes.load();
    auto fail = [&](const std::vector<std::pair<std::string, std::string>>& what) {
        objects.discard_staged([](const hash::Digest&) { return false; });
        for (const auto& [path, msg] : what)
            if (problems) problems({pid, util::printable(path), for_add(msg) + " (staging directory " + source + ")"});
        r.failed = true;
        r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        return r;
    };
    if (!bad.empty()) return fail(bad);

    // 2. The manifest, staged beside the objects; both durable, then named, then the ref.
    manifest::normalize(entries);
    const std::string enc = manifest::encode(entries);
    const hash::Digest mobj = manifest::digest_of(enc);
    auto& index = s.packages();
    index.stage(name, enc, mobj);
    io::crash_point("add.staged");
    std::vector<std::string> quarantined_manifests;
    cas::PublishStats published;
    try {
        published = objects.publish();
        index.publish(&quarantined_manifests, published.synced_staged);
    } catch (...) {
        index.discard();
        throw;
    }
    io::crash_point("add.published");

    // 3. Verified: the staging directory is still what the manifest says (every file re-hashed), and
    //    every object it needs is under objects/ with its size.
    catalog::Package pkg;
    pkg.name = name;
    auto diffs = verify::compare_tree(src.get(), ".", pkg, entries);
    std::unordered_set<hash::Digest, hash::DigestHash> checked;
    for (const auto& e : entries) {
        if (e.type != catalog::EntryType::file || !e.digest || !checked.insert(*e.digest).second) continue;
        std::uint64_t size = 0;
        if (!objects.on_disk(*e.digest, &size) || size != e.size)
            diffs.emplace_back(e.path, "object " + e.digest->hex() + " is missing from objects/ or has the wrong size");
    }
    if (!diffs.empty()) {
        // Nothing is recorded: the ref just placed names a package the catalog does not list (dropped
        // here, else by the next command's sync); the objects and manifest are gc's.
        (void)store::mirror_step([&] { index.drop_ref(name); });
        return fail(diffs);
    }

    // 4. Recorded, in one transaction: the package, its manifest, its new objects, the store mode.
    {
        catalog::Transaction tx(cat.db());
        const auto from = cat.mode();
        auto id = cat.add_package(name);
        cat.put_manifest(id, entries, mobj);
        std::unordered_set<hash::Digest, hash::DigestHash> added;
        for (const auto& e : entries)
            if (e.type == catalog::EntryType::file && e.digest && added.insert(*e.digest).second)
                cat.add_object({*e.digest, static_cast<std::int64_t>(e.size),
                                static_cast<std::int64_t>(objects.stored_size(*e.digest).value_or(e.size))});
        cat.set_tree(id, catalog::TreeState::removed);
        cat.set_state(id, catalog::PackageState::verified);
        if (from == catalog::StoreMode::legacy) {
            cat.set_mode(catalog::StoreMode::dual);
            cat.journal("add", "", "legacy", "dual", "store mode");
        }
        cat.journal("add", pid, "", "verified",
                    std::to_string(r.files) + " files, " + std::to_string(r.bytes) + " bytes from " + source +
                        " (no legacy tree)");
        tx.commit();
        io::crash_point("add.committed");
        if (from == catalog::StoreMode::legacy)
            if (auto w = store::mirror_step([&] { store::record_mode(index, "dual"); }))
                if (problems) problems({"-", "packages/store", *w, true});
    }
    for (const auto& q : published.quarantined)
        if (problems)
            problems({"-", "objects/" + cas::object_relpath(q.digest),
                      q.why + ": it was not the object; moved to " + q.moved_to + " and the object rewritten", true});
    for (const auto& q : quarantined_manifests)
        if (problems) problems({"-", q, "the manifest was written again", true});
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    return r;
}

} // namespace casmig::lifecycle
