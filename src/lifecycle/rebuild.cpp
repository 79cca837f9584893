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
    auto warn = [&](const std::string& pkg, const std::string& path, const std::string& msg) {
        if (problems) problems({pkg, path, msg, true});
    };
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
        warn("-", "migration/identity", std::string(e.what()) + ": a new identity is written");
    }
    auto& index = s.packages();
    auto& objects = s.objects();
    const std::string aside = s.migration_dir() + "/aside";
    std::map<std::string, std::string> settings;
    try {
        settings = index.settings();
    } catch (const util::SystemError&) {
        throw;
    } catch (const util::Error& e) {
        warn("-", "packages/store", std::string(e.what()) + ": the mode is inferred from the trees");
    }

    // 2. Who is there: every ref (a regular file named like a package), every legacy directory.
    std::map<std::string, Candidate> cands;
    const std::string refs_dir = s.root() + "/packages/refs";
    util::Fd refs_fd = util::open_dir(refs_dir);
    for (const auto& n : index.ref_names()) {
        struct stat st {};
        if (!store::is_package_name(n) || ::fstatat(refs_fd.get(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
            !S_ISREG(st.st_mode)) {
            warn(util::printable(n), "packages/refs", "not a package reference (not a regular file named like a package): ignored");
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
    for (const auto& d : s.legacy_dirs()) {
        auto [it, fresh] = cands.try_emplace(d);
        it->second.name = d;
        it->second.tree = true;
    }

    // 3. Each manifest: read (it must hash to its name) and decode. One of a newer format stops the
    // rebuild before anything is written: a newer casmig can rebuild this store, this one cannot.
    std::set<hash::Digest> named;
    for (auto& [n, c] : cands) {
        if (!c.manifest_object) continue;
        named.insert(*c.manifest_object);
        if (!c.lost.empty()) continue;
        try {
            c.manifest = manifest::decode(index.read_manifest(*c.manifest_object));
        } catch (const manifest::VersionError& e) {
            throw util::RefusedError("package " + util::printable(n) + ": " + e.what() +
                                     " (rebuild-catalog with a casmig that reads it); nothing was written");
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error& e) {
            c.lost = e.what();
        }
    }
    // A damaged manifest of a package whose tree is gone is the last trace of it: kept aside (its ref
    // goes with the package's missing manifest, and gc would then delete the file).
    for (auto& [n, c] : cands) {
        if (c.lost.empty() || c.tree || !c.manifest_object) continue;
        util::ensure_dir(aside, 0700);
        util::Fd a = util::open_dir(aside);
        util::Fd mdir = util::open_dir(s.root() + "/packages/manifests");
        std::string to = "manifest-" + c.manifest_object->hex() + "." + utc_stamp();
        if (io::renameat2(mdir.get(), cas::object_relpath(*c.manifest_object).c_str(), a.get(), to.c_str(), RENAME_NOREPLACE) == 0) {
            util::fsync_fd(a.get(), aside);
            c.lost += "; the damaged manifest is kept at " + aside + "/" + to;
        }
    }
    // Manifests no ref names: a removed package's (gc would have deleted them) or one whose ref was
    // lost. Without a name no package can be made of them; they go to migration/aside/, never deleted.
    for (const auto& d : index.manifest_objects()) {
        if (named.count(d)) continue;
        util::ensure_dir(aside, 0700);
        util::Fd a = util::open_dir(aside);
        std::string rel = cas::object_relpath(d);
        util::Fd mdir = util::open_dir(s.root() + "/packages/manifests");
        std::string to = "manifest-" + d.hex() + "." + utc_stamp();
        if (io::renameat2(mdir.get(), rel.c_str(), a.get(), to.c_str(), RENAME_NOREPLACE) == 0) {
            util::fsync_fd(a.get(), aside);
            ++r.orphan_manifests;
        }
    }
    if (r.orphan_manifests)
        warn("-", "packages/manifests", std::to_string(r.orphan_manifests) +
                                            " manifest object(s) that no package reference names (removed packages', or a lost "
                                            "reference's) are kept in " + aside + "/manifest-*: inspect them before deleting");

    // 4. Every (object, size) a manifest claims is proven once, in parallel: the object must be there
    // and hash to its name at that size. A size no object has makes only the manifest claiming it
    // unusable; only content proven wrong is quarantined (never an object on an I/O error).
    std::set<std::pair<hash::Digest, std::uint64_t>> claims;
    for (const auto& [n, c] : cands)
        for (const auto& e : c.manifest)
            if (e.type == catalog::EntryType::file && e.digest) claims.emplace(*e.digest, e.size);
    std::vector<std::pair<hash::Digest, std::uint64_t>> todo(claims.begin(), claims.end());
    std::map<std::pair<hash::Digest, std::uint64_t>, std::string> bad; // claim -> why
    std::mutex mu;
    Progress prog;
    prog.phase = "rebuild-catalog: objects";
    prog.unit = "objects";
    prog.packages_total = cands.size();
    for (const auto& o : todo) prog.bytes_total += o.second;
    const unsigned nthreads = util::thread_count(threads);
    tbb::task_arena arena(static_cast<int>(nthreads));
    arena.execute([&] {
        tbb::parallel_for_each(todo.begin(), todo.end(), [&](const std::pair<hash::Digest, std::uint64_t>& o) {
            std::string why = verify::prove_object(objects, o.first, o.second);
            std::lock_guard lk(mu);
            if (!why.empty()) bad.emplace(o, why);
            ++prog.files_done;
            prog.bytes_done += o.second;
            if (progress && prog.files_done % 256 == 0) progress(prog);
        });
    });
    std::set<hash::Digest> quarantined;
    for (const auto& [claim, why] : bad) {
        if (why.rfind("content does not match", 0) != 0 || quarantined.count(claim.first)) continue;
        std::string rel = cas::object_relpath(claim.first);
        std::string moved;
        try {
            moved = objects.quarantine(rel);
        } catch (const util::Error&) {
            moved = "(could not be moved: left in place)";
        }
        quarantined.insert(claim.first);
        ++r.objects_quarantined;
        warn("-", "objects/" + rel, why + ": moved to " + moved);
    }
    for (auto& [n, c] : cands)
        for (const auto& e : c.manifest)
            if (e.type == catalog::EntryType::file && e.digest) {
                auto b = bad.find({*e.digest, e.size});
                if (b != bad.end()) {
                    c.missing = util::printable(e.path) + ": object " + e.digest->hex() + " " + b->second;
                    break;
                }
            }
    auto usable = [](const Candidate& c) { return c.lost.empty() && !c.manifest.empty() && c.missing.empty(); };

    // 5. Trees an interrupted cleanup or remove left in temp/ (the journal that said which is in the
    // lost catalog): a tree exactly equal to its package's sound manifest goes back under its name;
    // anything else goes to migration/aside/. Never deleted: a tree that differs may hold the only copy
    // of a change made after cutover.
    for (const auto& n : util::list_dir(objects.temp_dirfd(), s.temp_dir())) {
        if (n.rfind("trash-", 0) != 0) continue;
        auto dash = n.find('-', 6);
        std::string tag = dash == std::string::npos ? std::string() : n.substr(dash + 1);
        const std::string display = s.temp_dir() + "/" + util::printable(n);
        Candidate* owner = nullptr;
        for (auto& [name, c] : cands)
            if (name_tag(name) == tag) owner = &c;
        if (owner && !owner->tree && usable(*owner)) {
            catalog::Package p;
            p.name = owner->name;
            auto diffs = verify::compare_tree(objects.temp_dirfd(), n, p, owner->manifest, true);
            if (diffs.empty() &&
                io::renameat2(objects.temp_dirfd(), n.c_str(), s.root_fd(), owner->name.c_str(), RENAME_NOREPLACE) == 0) {
                cas::sync_filesystem(s.root_fd(), s.root());
                io::crash_point("rebuild.moved-back");
                owner->tree = true;
                warn(util::printable(owner->name), "", "legacy tree moved back from " + display + " (an interrupted cleanup or remove)");
                ++r.trees_moved_back;
                continue;
            }
        }
        move_aside(objects.temp_dirfd(), n, aside, display);
        warn(owner ? util::printable(owner->name) : "-", display,
             "a legacy tree an interrupted cleanup or remove moved aside, which is not exactly its package's manifest "
             "(or whose package is unknown): kept in " + aside + "/");
    }

    // 6. The store mode: as packages/store records it, else what the trees say. Never flipped from
    // legacy (after a rollback the package manager may remove packages: their trees are just gone).
    StoreMode mode = StoreMode::legacy;
    auto ms = settings.find("mode");
    if (ms != settings.end()) {
        mode = catalog::store_mode_from(ms->second);
    } else {
        bool any_manifest = false, any_gone = false;
        for (const auto& [n, c] : cands) {
            if (!usable(c)) continue;
            any_manifest = true;
            if (!c.tree) any_gone = true;
        }
        mode = any_gone ? StoreMode::file_level : any_manifest ? StoreMode::dual : StoreMode::legacy;
        r.mode_inferred = true;
    }

    // 7. Trees that are present are compared with their manifests (in parallel).
    std::vector<Candidate*> compare;
    for (auto& [n, c] : cands)
        if (c.tree && usable(c) && mode != StoreMode::legacy) compare.push_back(&c);
    prog.phase = "rebuild-catalog: trees";
    prog.files_done = prog.packages_done = 0;
    prog.bytes_done = prog.bytes_total = 0;
    prog.packages_total = compare.size();
    arena.execute([&] {
        tbb::parallel_for_each(compare.begin(), compare.end(), [&](Candidate* c) {
            catalog::Package p;
            p.name = c->name;
            auto diffs = verify::compare_tree(s.root_fd(), c->name, p, c->manifest, false);
            std::lock_guard lk(mu);
            if (!diffs.empty())
                c->drift = (diffs[0].first.empty() ? std::string("its root") : util::printable(diffs[0].first)) + ": " +
                           diffs[0].second + (diffs.size() > 1 ? " (and " + std::to_string(diffs.size() - 1) + " more)" : "");
            ++prog.packages_done;
            if (progress) progress(prog);
        });
    });

    // 8. The old catalog (and its -wal, -shm) is moved aside, never deleted; then the new one is
    // written in one transaction with the store's identity.
    const std::string db = s.db_path();
    std::string stamp = utc_stamp();
    for (int n = 1; ::access((db + ".replaced-" + stamp).c_str(), F_OK) == 0; ++n)
        stamp = utc_stamp() + "-" + std::to_string(n);
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
        auto slash = db.find_last_of('/');
        std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : db.substr(0, slash);
        util::Fd d = util::open_dir(dir);
        util::fsync_fd(d.get(), dir);
    }
    io::crash_point("rebuild.old-moved");
    catalog::Identity id{marker ? marker->store_id : store::new_store_id(), (marker ? marker->generation : 0) + 1};
    {
        catalog::Catalog cat(db, catalog::OpenMode::read_write);
        // Bytes an object takes under objects/ (its .zst form's, when compressed; a sparse one's apparent).
        auto stored_size = [&](const hash::Digest& d, std::uint64_t logical) -> std::int64_t {
            try {
                cas::ObjectReader rd = objects.open_content(d);
                struct stat st {};
                if (::fstat(rd.fd(), &st) == 0) return static_cast<std::int64_t>(st.st_size);
            } catch (const util::Error&) {
            }
            return static_cast<std::int64_t>(logical);
        };
        catalog::Transaction tx(cat.db());
        cat.claim(id);
        std::set<hash::Digest> added;
        auto add_manifest_objects = [&](const Candidate& c) {
            for (const auto& e : c.manifest)
                if (e.type == catalog::EntryType::file && e.digest && !quarantined.count(*e.digest) &&
                    !bad.count({*e.digest, e.size}) && added.insert(*e.digest).second)
                    cat.add_object({*e.digest, static_cast<std::int64_t>(e.size), stored_size(*e.digest, e.size)});
        };
        for (auto& [n, c] : cands) {
            const std::string pid = util::printable(n);
            std::int64_t pk = cat.add_package(n);
            ++r.packages;
            if (!usable(c) && c.tree) {
                // The tree is the truth: migrate takes it from the start.
                if (c.manifest_object)
                    warn(pid, "", (c.lost.empty() ? c.missing : c.lost) +
                                      ": its legacy tree is present, so it is pending and casmig migrate takes it again");
                ++r.pending;
                continue;
            }
            if (!usable(c)) {
                // Neither a tree nor a sound manifest with all its objects. A manifest that decodes is
                // kept (with what is left of its objects, which gc then keeps too); one that does not
                // stays where it is, named by its ref, and is reported.
                std::string why = c.lost.empty() ? c.missing : c.lost;
                if (!c.manifest.empty()) {
                    cat.put_manifest(pk, c.manifest, c.manifest_object);
                    add_manifest_objects(c);
                }
                cat.set_tree(pk, TreeState::removed);
                cat.set_state(pk, PackageState::failed, "rebuild-catalog: " + why);
                cat.journal("rebuild-catalog", pid, "", "failed", why);
                if (problems)
                    problems({pid, "", why + "; its legacy tree is gone: its content cannot be fully recovered (restore the "
                                             "package from the package manager, or a backup of the store)"});
                ++r.lost;
                continue;
            }
            cat.put_manifest(pk, c.manifest, c.manifest_object);
            add_manifest_objects(c);
            TreeState tree = !c.tree ? TreeState::removed : mode == StoreMode::file_level ? TreeState::marked : TreeState::present;
            PackageState state = mode == StoreMode::legacy ? PackageState::rolled_back : PackageState::verified;
            if (mode == StoreMode::legacy && !c.tree)
                warn(pid, "", "its legacy tree is gone in a legacy store (removed after a rollback?): recorded rolled_back "
                              "with the tree removed; casmig remove drops it");
            if (!c.drift.empty() && mode == StoreMode::dual) {
                // Before cutover the legacy tree is the truth (as verify decides): migrate takes it again.
                state = PackageState::failed;
                cat.set_state(pk, state, "legacy tree differs from its manifest: " + c.drift);
                if (problems)
                    problems({pid, "", "legacy tree differs from its manifest (" + c.drift +
                                           "): recorded failed; casmig migrate --retry-failed takes it again"});
                ++r.failed;
            } else {
                cat.set_state(pk, state);
                if (!c.drift.empty()) {
                    // After cutover the manifest is the truth (G8): it is kept, the tree too (cleanup keeps
                    // a tree that differs), and the difference is reported.
                    if (problems)
                        problems({pid, "", "legacy tree differs from its manifest (" + c.drift +
                                               "): the manifest is kept and cleanup keeps the tree; restore the tree, or "
                                               "casmig remove the package and install it again"});
                    ++r.failed;
                } else {
                    ++r.recovered;
                }
            }
            cat.set_tree(pk, tree);
        }
        // Objects no manifest names stay listed (gc decides about them), by their size on disk.
        for (const auto& rel : objects.list_files()) {
            if (rel.size() < 65) continue;
            auto d = hash::Digest::from_hex(rel.substr(0, 2) + rel.substr(3, 62));
            if (!d || added.count(*d) || quarantined.count(*d)) continue;
            bool claimed = false;
            for (auto it = claims.lower_bound({*d, 0}); it != claims.end() && it->first == *d; ++it) claimed = true;
            if (claimed) continue; // claimed but not proven: not listed as good
            struct stat st {};
            if (::fstatat(objects.dirfd(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) continue;
            added.insert(*d);
            cat.add_object({*d, static_cast<std::int64_t>(st.st_size), static_cast<std::int64_t>(st.st_size)});
        }
        r.objects = added.size();
        cat.set_mode(mode);
        // The zstd mode, as packages/store mirrors it; without it, a store holding .zst objects is told.
        auto cs = settings.find("compression");
        if (cs != settings.end()) {
            try {
                store::write_compression(cat, cas::Compression::parse(cs->second));
                r.compression = cs->second;
            } catch (const util::Error& e) {
                warn("-", "packages/store", std::string("compression setting unreadable (") + e.what() +
                                                "): the store is recorded uncompressed; .zst objects stay readable");
            }
        }
        cat.journal("rebuild-catalog", "", "", catalog::to_string(mode),
                    "catalog rebuilt from the store (" + r.reason + "): " + std::to_string(r.packages) + " packages, " +
                        std::to_string(r.objects) + " objects; the journal before this rebuild is not recoverable" +
                        (r.old_catalog.empty() ? std::string() : "; the old catalog is kept at " + r.old_catalog));
        tx.commit();
    }
    io::crash_point("rebuild.committed");
    s.write_identity(id);
    if (auto w = store::mirror_step([&] { store::record_mode(index, catalog::to_string(mode)); }))
        warn("-", "packages/store", *w);
    r.mode = catalog::to_string(mode);
    return r;
}

} // namespace casmig::lifecycle
