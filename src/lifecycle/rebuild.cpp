// rebuild-catalog: recreates store.db from the store alone (packages/, objects/, legacy trees).
// What is trusted: nothing by name. Each manifest object must hash to its name and decode; each object a
// manifest needs is re-hashed; each legacy tree that is present is compared with its manifest before its
// package is called verified. What cannot be proven is said, one line per package.
#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/manifest/manifest.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"

#include <cerrno>
#include <ctime>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <set>
#include <sys/random.h>
#include <sys/stat.h>
#include <tbb/parallel_for_each.h>
#include <tbb/task_arena.h>
#include <unistd.h>
#include <unordered_map>

namespace casmig::lifecycle {

using catalog::PackageState;
using catalog::StoreMode;
using catalog::TreeState;

namespace {

std::string name_tag(const std::string& name) { return hash::hash_bytes(name).hex().substr(0, 16); }

std::string utc_stamp() {
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    ::gmtime_r(&t, &tm);
    char b[32];
    std::strftime(b, sizeof b, "%Y%m%dT%H%M%SZ", &tm);
    return b;
}

std::string random_store_id() {
    unsigned char b[16];
    size_t got = 0;
    while (got < sizeof b) {
        ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) util::throw_errno("cannot draw a random store identity", "getrandom");
        got += static_cast<size_t>(n);
    }
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned char c : b) {
        out.push_back(hex[c >> 4]);
        out.push_back(hex[c & 15]);
    }
    return out;
}

struct Candidate {
    std::string name;
    bool tree = false;                       // a directory at its name
    std::optional<hash::Digest> manifest_object;
    std::vector<catalog::Entry> manifest;    // decoded, when the ref and its manifest are sound
    std::string lost;                        // why the manifest cannot be used ("" if it can)
    std::string drift;                       // the tree differs from the manifest (first difference)
    std::string missing;                     // an object the manifest needs is missing or wrong
};

/// Moves every file `name` in `from` (dirfd) to the directory `to` without replacing anything.
void move_aside(int fromfd, const std::string& name, const std::string& to_dir, const std::string& display) {
    util::ensure_dir(to_dir, 0700);
    util::Fd a = util::open_dir(to_dir);
    std::string an = name + "." + utc_stamp();
    if (io::renameat2(fromfd, name.c_str(), a.get(), an.c_str(), RENAME_NOREPLACE) != 0)
        util::throw_errno("cannot move aside", display);
    util::fsync_fd(a.get(), to_dir);
}

} // namespace

RebuildResult rebuild_catalog(store::Store& s, bool force, unsigned threads, const ProgressSink& progress,
                              const ProblemSink& problems) {
    RebuildResult r;
    // 1. Replace only a catalog that does not fit its store (unless asked to).
    auto misfit = s.catalog_misfit();
    if (!misfit && !force)
        throw util::RefusedError("catalog " + s.db_path() + " belongs to store " + s.root() +
                                 " and is sound: rebuild-catalog replaces only a lost, damaged or stale catalog "
                                 "(--force rebuilds it anyway, keeping the old one)");
    r.reason = misfit ? *misfit : "asked with --force";
    std::optional<catalog::Identity> marker;
    try {
        marker = s.read_marker();
    } catch (const util::RefusedError& e) {
        if (problems) problems({"-", "migration/identity", std::string(e.what()) + ": a new identity is written", true});
    }
    auto& index = s.packages();
    auto& objects = s.objects();
    auto settings = index.settings();

    // 2. Who is there: every ref, every legacy directory.
    std::map<std::string, Candidate> cands;
    for (const auto& n : index.ref_names()) {
        if (!store::is_package_name(n)) {
            if (problems) problems({util::printable(n), "packages/refs", "not a package name: ignored", true});
            continue;
        }
        Candidate c;
        c.name = n;
        try {
            c.manifest_object = index.ref(n);
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error& e) {
            c.lost = e.what();
        }
        cands.emplace(n, std::move(c));
    }
    // 3. Trees an interrupted cleanup or remove left in temp/: back under their name (its journal,
    // which said which, is in the catalog being replaced), or to migration/aside/ — never deleted.
    for (const auto& n : util::list_dir(objects.temp_dirfd(), s.temp_dir())) {
        if (n.rfind("trash-", 0) != 0) continue;
        auto dash = n.find('-', 6);
        std::string tag = dash == std::string::npos ? std::string() : n.substr(dash + 1);
        const std::string display = s.temp_dir() + "/" + util::printable(n);
        const Candidate* owner = nullptr;
        for (const auto& [name, c] : cands)
            if (name_tag(name) == tag) owner = &c;
        struct stat st {};
        if (owner && ::fstatat(s.root_fd(), owner->name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT &&
            io::renameat2(objects.temp_dirfd(), n.c_str(), s.root_fd(), owner->name.c_str(), RENAME_NOREPLACE) == 0) {
            cas::sync_filesystem(s.root_fd(), s.root());
            io::crash_point("rebuild.moved-back");
            if (problems)
                problems({util::printable(owner->name), "", "legacy tree moved back from " + display + " (an interrupted cleanup or remove)", true});
            ++r.trees_moved_back;
            continue;
        }
        move_aside(objects.temp_dirfd(), n, s.migration_dir() + "/aside", display);
        if (problems)
            problems({"-", display, "a legacy tree an interrupted cleanup or remove moved aside, whose package is unknown "
                                    "or whose name is taken: kept in " + s.migration_dir() + "/aside/", true});
    }
    for (const auto& d : s.legacy_dirs()) {
        auto [it, fresh] = cands.try_emplace(d);
        it->second.name = d;
        it->second.tree = true;
    }

    // 4. Each manifest: read (hashes to its name), decode.
    for (auto& [n, c] : cands) {
        if (!c.lost.empty() || !c.manifest_object) continue;
        try {
            c.manifest = manifest::decode(index.read_manifest(*c.manifest_object));
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error& e) {
            c.lost = e.what();
        }
    }
    // 5. Every object a manifest needs is re-hashed once (in parallel); a wrong one is quarantined.
    std::map<hash::Digest, std::uint64_t> needed;
    for (const auto& [n, c] : cands)
        for (const auto& e : c.manifest)
            if (e.type == catalog::EntryType::file && e.digest) needed.emplace(*e.digest, e.size);
    std::vector<std::pair<hash::Digest, std::uint64_t>> todo(needed.begin(), needed.end());
    std::map<hash::Digest, std::string> bad; // digest -> why
    std::mutex mu;
    Progress prog;
    prog.phase = "rebuild-catalog: objects";
    prog.packages_total = cands.size();
    for (const auto& o : todo) prog.bytes_total += o.second;
    const unsigned nthreads = util::thread_count(threads);
    tbb::task_arena arena(static_cast<int>(nthreads));
    arena.execute([&] {
        tbb::parallel_for_each(todo.begin(), todo.end(), [&](const std::pair<hash::Digest, std::uint64_t>& o) {
            std::string why = verify::prove_object(objects, o.first, o.second);
            std::lock_guard lk(mu);
            if (!why.empty()) bad.emplace(o.first, why);
            ++prog.files_done;
            prog.bytes_done += o.second;
            if (progress && prog.files_done % 256 == 0) progress(prog);
        });
    });
    for (const auto& [d, why] : bad) {
        if (why == "is missing") continue;
        std::string rel = cas::object_relpath(d);
        std::string moved;
        try {
            moved = objects.quarantine(rel);
        } catch (const util::Error&) {
            moved = "(could not be moved: left in place)";
        }
        ++r.objects_quarantined;
        if (problems) problems({"-", "objects/" + rel, why + ": moved to " + moved, true});
    }
    for (auto& [n, c] : cands)
        for (const auto& e : c.manifest)
            if (e.type == catalog::EntryType::file && e.digest) {
                auto b = bad.find(*e.digest);
                if (b != bad.end()) {
                    c.missing = util::printable(e.path) + ": object " + e.digest->hex() + " " + b->second;
                    break;
                }
            }

    // 6. The store mode: as recorded in packages/store, else what the trees say.
    StoreMode mode = StoreMode::legacy;
    auto ms = settings.find("mode");
    if (ms != settings.end()) {
        mode = catalog::store_mode_from(ms->second);
    } else {
        bool any_manifest = false, any_gone = false;
        for (const auto& [n, c] : cands) {
            if (c.manifest.empty()) continue;
            any_manifest = true;
            if (!c.tree) any_gone = true;
        }
        mode = any_gone ? StoreMode::file_level : any_manifest ? StoreMode::dual : StoreMode::legacy;
        r.mode_inferred = true;
    }
    for (const auto& [n, c] : cands)
        if (!c.manifest.empty() && !c.tree && mode == StoreMode::legacy) {
            // A tree is gone while the store says legacy (a rollback that did not finish): rollback must
            // be able to run again, which it does from file-level.
            mode = StoreMode::file_level;
            r.mode_inferred = true;
        }

    // 7. Trees that are present are compared with their manifests (in parallel).
    std::vector<Candidate*> compare;
    for (auto& [n, c] : cands)
        if (c.tree && !c.manifest.empty() && mode != StoreMode::legacy) compare.push_back(&c);
    prog.phase = "rebuild-catalog: trees";
    prog.files_done = 0;
    prog.bytes_done = prog.bytes_total = 0;
    prog.packages_total = compare.size();
    arena.execute([&] {
        tbb::parallel_for_each(compare.begin(), compare.end(), [&](Candidate* c) {
            catalog::Package p;
            p.name = c->name;
            auto diffs = verify::compare_tree(s.root_fd(), c->name, p, c->manifest, false);
            std::lock_guard lk(mu);
            if (!diffs.empty()) c->drift = util::printable(diffs[0].first) + ": " + diffs[0].second;
            ++prog.packages_done;
            if (progress) progress(prog);
        });
    });

    // 8. The old catalog (and its -wal, -shm) is moved aside, never deleted; then the new one is
    // written in one transaction with the store's identity.
    const std::string db = s.db_path();
    const std::string stamp = utc_stamp();
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) {
        std::string from = db + suffix;
        struct stat st {};
        if (::lstat(from.c_str(), &st) != 0) continue;
        std::string to = db + ".replaced-" + stamp + suffix;
        if (io::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0)
            util::throw_errno("cannot move the old catalog aside to " + to + " from", from);
        if (*suffix == '\0') r.old_catalog = to;
    }
    {
        std::string dir = db.substr(0, db.find_last_of('/') == std::string::npos ? 0 : db.find_last_of('/'));
        util::Fd d = util::open_dir(dir.empty() ? "." : dir);
        util::fsync_fd(d.get(), dir);
    }
    io::crash_point("rebuild.old-moved");
    catalog::Identity id{marker ? marker->store_id : random_store_id(), (marker ? marker->generation : 0) + 1};
    {
        catalog::Catalog cat(db, catalog::OpenMode::read_write);
        catalog::Transaction tx(cat.db());
        cat.claim(id);
        std::set<hash::Digest> added;
        auto add_object = [&](const hash::Digest& d, std::uint64_t size) {
            if (bad.count(d) || !added.insert(d).second) return;
            cat.add_object({d, static_cast<std::int64_t>(size), static_cast<std::int64_t>(size)});
        };
        for (auto& [n, c] : cands) {
            const std::string pid = util::printable(n);
            std::int64_t pk = cat.add_package(n);
            ++r.packages;
            bool usable = c.lost.empty() && !c.manifest.empty() && c.missing.empty();
            if (!usable && c.tree) {
                // The tree is the truth: migrate takes it from the start.
                if (c.manifest_object && problems)
                    problems({pid, "", (c.lost.empty() ? c.missing : c.lost) + ": its legacy tree is present, so it is pending and casmig migrate takes it again", true});
                ++r.pending;
                continue;
            }
            if (!usable) {
                // Neither a tree nor a sound manifest with all its objects: what is lost is said.
                if (!c.manifest.empty()) {
                    cat.put_manifest(pk, c.manifest, c.manifest_object);
                    for (const auto& e : c.manifest)
                        if (e.type == catalog::EntryType::file && e.digest) add_object(*e.digest, e.size);
                }
                cat.set_tree(pk, TreeState::removed);
                std::string why = c.lost.empty() ? c.missing : c.lost;
                cat.set_state(pk, PackageState::failed, "rebuild-catalog: " + why);
                cat.journal("rebuild-catalog", pid, "", "failed", why);
                if (problems)
                    problems({pid, "", why + "; its legacy tree is gone: its content cannot be fully recovered (restore the "
                                             "package from the package manager, or a backup of the store)"});
                ++r.lost;
                continue;
            }
            cat.put_manifest(pk, c.manifest, c.manifest_object);
            for (const auto& e : c.manifest)
                if (e.type == catalog::EntryType::file && e.digest) add_object(*e.digest, e.size);
            PackageState state = PackageState::verified;
            TreeState tree = c.tree ? (mode == StoreMode::file_level ? TreeState::marked : TreeState::present) : TreeState::removed;
            if (mode == StoreMode::legacy) state = PackageState::rolled_back;
            if (!c.drift.empty()) {
                state = PackageState::failed;
                cat.set_state(pk, state, "legacy tree differs from its manifest: " + c.drift);
                if (problems)
                    problems({pid, "", "legacy tree differs from its manifest (" + c.drift + "): recorded failed; casmig migrate --retry-failed takes it again"});
                ++r.failed;
            } else {
                cat.set_state(pk, state);
                ++r.recovered;
            }
            cat.set_tree(pk, tree);
        }
        // Objects no manifest names stay listed (gc decides about them), by their size on disk.
        for (const auto& rel : objects.list_files()) {
            if (rel.size() < 65) continue;
            auto d = hash::Digest::from_hex(rel.substr(0, 2) + rel.substr(3, 62));
            if (!d || needed.count(*d)) continue;
            struct stat st {};
            if (::fstatat(objects.dirfd(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
            add_object(*d, static_cast<std::uint64_t>(st.st_size));
        }
        r.objects = added.size();
        cat.set_mode(mode);
        cat.journal("rebuild-catalog", "", "", catalog::to_string(mode),
                    "catalog rebuilt from the store (" + r.reason + "): " + std::to_string(r.packages) + " packages, " +
                        std::to_string(r.objects) + " objects; the journal before this rebuild is not recoverable" +
                        (r.old_catalog.empty() ? std::string() : "; the old catalog is kept at " + r.old_catalog));
        tx.commit();
    }
    io::crash_point("rebuild.committed");
    s.write_identity(id);
    if (auto w = store::mirror_step([&] { store::record_mode(index, catalog::to_string(mode)); }))
        if (problems) problems({"-", "packages/store", *w, true});
    r.mode = catalog::to_string(mode);
    return r;
}

} // namespace casmig::lifecycle
