#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"
#include "materialize.hpp"

#include <atomic>
#include <cerrno>
#include <dirent.h>
#include <fcntl.h>
#include <mutex>
#include <set>
#include <sys/stat.h>
#include <tbb/parallel_for_each.h>
#include <tbb/task_arena.h>
#include <thread>
#include <unistd.h>
#include <unordered_set>

namespace casmig::lifecycle {

using catalog::PackageState;
using catalog::StoreMode;
using catalog::TreeState;

namespace {

std::string gc_lock_path(store::Store& s) { return s.migration_dir() + "/gc.lock"; }

/// Name of the staging / trash entry of a package in temp/ (package ids may be 255 bytes long).
std::string temp_name(const char* what, std::int64_t id) { return std::string(what) + "-" + std::to_string(id); }

bool objects_complete(store::Store& s, const catalog::Package& p, const ProblemSink& problems) {
    auto& cat = s.catalog();
    auto& objects = s.objects();
    for (const auto& e : cat.manifest(p.id)) {
        if (e.type != catalog::EntryType::file || !e.digest) continue;
        std::uint64_t size = 0;
        if (!objects.on_disk(*e.digest, &size) || size != e.size) {
            if (problems)
                problems({util::printable(p.name), util::printable(e.path),
                          "object " + e.digest->hex() + " is missing or has the wrong size; the legacy tree is kept: "
                          "run casmig verify --objects, then casmig rollback or migrate --retry-failed"});
            return false;
        }
    }
    return true;
}

std::uint64_t tree_bytes(int dirfd, const std::string& name) {
    std::uint64_t total = 0;
    int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return 0;
    DIR* d = ::fdopendir(fd);
    if (!d) {
        ::close(fd);
        return 0;
    }
    while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n == "." || n == "..") continue;
        struct stat st {};
        if (::fstatat(::dirfd(d), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (S_ISDIR(st.st_mode)) total += tree_bytes(::dirfd(d), n);
        else if (S_ISREG(st.st_mode)) total += static_cast<std::uint64_t>(st.st_size);
    }
    ::closedir(d);
    return total;
}

} // namespace

// ------------------------------------------------------------------ cutover

CutoverResult cutover(store::Store& s, unsigned threads, const ProgressSink& progress, const ProblemSink& problems) {
    auto& cat = s.catalog();
    auto mode = cat.mode();
    if (mode == StoreMode::file_level) throw util::RefusedError("store " + s.root() + " is already file-level; nothing to cut over");
    // Refuse while anything is not verified. Nothing is written before the checks pass.
    auto pkgs = cat.packages();
    std::set<std::string> known;
    std::vector<std::string> not_ready;
    for (const auto& p : pkgs) {
        known.insert(p.name);
        if (p.state != PackageState::verified)
            not_ready.push_back(util::printable(p.name) + " (" + catalog::to_string(p.state) + ")");
    }
    std::vector<std::string> unknown;
    for (const auto& d : s.legacy_dirs())
        if (!known.count(d)) unknown.push_back(util::printable(d));
    if (!not_ready.empty() || !unknown.empty()) {
        std::string msg = "cutover needs every legacy package verified: ";
        if (!not_ready.empty()) msg += std::to_string(not_ready.size()) + " not verified (first: " + not_ready[0] + ")";
        if (!unknown.empty())
            msg += std::string(not_ready.empty() ? "" : ", ") + std::to_string(unknown.size()) +
                   " legacy director" + (unknown.size() == 1 ? "y" : "ies") + " not yet migrated (first: " + unknown[0] + ")";
        msg += "; run casmig migrate (with --retry-failed for failed ones), then cutover again; the store is unchanged";
        throw util::RefusedError(msg);
    }
    if (pkgs.empty()) throw util::RefusedError("store " + s.root() + " has no migrated packages; run casmig migrate first");
    // Final verify, recording nothing: a mismatch refuses the cutover and leaves the store as it was.
    verify::Options vo;
    vo.threads = threads;
    vo.record = verify::RecordState::no;
    auto vr = verify::verify_packages(s, pkgs, vo, progress, problems);
    if (vr.mismatched)
        throw util::RefusedError("final verify found " + std::to_string(vr.mismatched) +
                                 " package(s) that differ from their legacy trees (listed above); run casmig verify "
                                 "and migrate --retry-failed, then cutover again; the store is unchanged");
    CutoverResult r;
    catalog::Transaction tx(cat.db());
    for (const auto& p : pkgs) {
        ++r.packages;
        if (p.tree == TreeState::present) {
            cat.set_tree(p.id, TreeState::marked);
            ++r.marked;
        }
    }
    cat.set_mode(StoreMode::file_level);
    cat.journal("cutover", "", catalog::to_string(mode), "file-level",
                std::to_string(r.marked) + " legacy trees marked for cleanup");
    tx.commit();
    return r;
}

// ------------------------------------------------------------------ cleanup

CleanupResult cleanup(store::Store& s, DryRun dry, const ProgressSink& progress, const ProblemSink& problems) {
    auto& cat = s.catalog();
    if (cat.mode() != StoreMode::file_level)
        throw util::RefusedError("cleanup runs only after cutover (store mode is " + std::string(catalog::to_string(cat.mode())) +
                                 "); run casmig cutover first; nothing was deleted");
    CleanupResult r;
    std::vector<catalog::Package> marked;
    for (const auto& p : cat.packages()) {
        // A package migrated and verified after cutover is cleaned up like the others.
        bool late = p.tree == TreeState::present && p.state == PackageState::verified && p.has_manifest;
        if (p.tree == TreeState::marked || late) marked.push_back(p);
    }
    Progress report;
    report.phase = dry == DryRun::yes ? "cleanup (dry run)" : "cleanup";
    report.packages_total = marked.size();
    auto& objects = s.objects();
    std::vector<std::string> trashed;
    for (const auto& p : marked) {
        ++report.packages_done;
        // Never delete a tree whose content is not provably in the CAS.
        if (!p.has_manifest || !objects_complete(s, p, problems)) {
            if (!p.has_manifest && problems)
                problems({util::printable(p.name), "", "has no manifest; its legacy tree is kept"});
            ++r.skipped;
            continue;
        }
        struct stat st {};
        bool present = ::fstatat(s.root_fd(), p.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
        if (dry == DryRun::yes) {
            if (present) r.bytes += tree_bytes(s.root_fd(), p.name);
            ++r.trees;
            continue;
        }
        // 1. move the tree aside, atomically: it is either whole under its name or gone from it;
        // 2. record it removed; 3. delete the moved trees (below, in parallel). A crash after 1
        // leaves the tree in temp/, which the next locked run empties; the rerun then finds the tree
        // gone and records it (step 2).
        std::string trash = temp_name("trash", p.id);
        if (present) {
            util::remove_tree_at(objects.temp_dirfd(), trash, s.temp_dir() + "/" + trash);
            if (::renameat(s.root_fd(), p.name.c_str(), objects.temp_dirfd(), trash.c_str()) != 0)
                util::throw_errno("cannot move legacy tree aside", s.root() + "/" + util::printable(p.name));
            trashed.push_back(trash);
        }
        {
            catalog::Transaction tx(cat.db());
            cat.set_tree(p.id, TreeState::removed);
            cat.journal("cleanup", util::printable(p.name), catalog::to_string(p.tree), "removed");
            tx.commit();
        }
        ++r.trees;
        if (progress) progress(report);
    }
    // 3. Unlinking is the slow part (one journalled metadata update per file): spread the trees over
    // the cores.
    std::atomic<std::uint64_t> bytes{0};
    std::mutex mutex;
    std::exception_ptr first_error;
    tbb::task_arena arena(static_cast<int>(util::thread_count(0)));
    arena.execute([&] {
        tbb::parallel_for_each(trashed.begin(), trashed.end(), [&](const std::string& trash) {
            try {
                bytes += util::remove_tree_at(objects.temp_dirfd(), trash, s.temp_dir() + "/" + trash);
            } catch (...) {
                std::lock_guard lk(mutex);
                if (!first_error) first_error = std::current_exception();
            }
        });
    });
    if (first_error) std::rethrow_exception(first_error); // already recorded removed; temp/ is emptied next run
    r.bytes += bytes.load();
    return r;
}

// ------------------------------------------------------------------ rollback

RollbackResult rollback(store::Store& s, const ProgressSink& progress, const ProblemSink& problems) {
    auto& cat = s.catalog();
    auto& objects = s.objects();
    auto mode = cat.mode();
    auto pkgs = cat.packages();
    RollbackResult r;
    std::vector<catalog::Package> rebuild;
    for (const auto& p : pkgs) {
        if (p.tree != TreeState::removed) continue;
        struct stat st {};
        if (::fstatat(s.root_fd(), p.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
            // A killed rollback renamed this tree into place (only ever after it was complete and
            // synced) but did not record it: it is whole.
            continue;
        }
        if (!p.has_manifest)
            throw util::Error("package " + util::printable(p.name) + " has no legacy tree and no manifest: it cannot be "
                              "rebuilt; restore it from a backup or casmig remove it, then rollback again");
        rebuild.push_back(p);
    }
    // 1. Build every removed tree in temp/ (in parallel), from the manifest, exactly.
    Progress report;
    report.phase = "rollback";
    report.packages_total = rebuild.size();
    std::mutex mutex;
    std::vector<std::vector<catalog::Entry>> manifests;
    for (const auto& p : rebuild) manifests.push_back(cat.manifest(p.id));
    std::vector<size_t> idx(rebuild.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::exception_ptr first_error;
    tbb::task_arena arena(static_cast<int>(util::thread_count(0)));
    arena.execute([&] {
        tbb::parallel_for_each(idx.begin(), idx.end(), [&](size_t i) {
            const auto& p = rebuild[i];
            std::string stage = temp_name("rollback", p.id);
            try {
                util::remove_tree_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
                if (::mkdirat(objects.temp_dirfd(), stage.c_str(), 0700) != 0)
                    util::throw_errno("cannot create staging directory", s.temp_dir() + "/" + stage);
                util::Fd fd = util::open_dir_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
                MaterializeResult mr;
                detail::build_tree(fd.get(), s.root() + "/" + util::printable(p.name), manifests[i], objects,
                                   LinkMode::reflink, mr);
                std::lock_guard lk(mutex);
                r.files += mr.files;
                r.bytes += mr.bytes;
                ++report.packages_done;
                report.files_done += mr.files;
                report.bytes_done += mr.bytes;
                if (progress) progress(report);
            } catch (...) {
                std::lock_guard lk(mutex);
                if (!first_error) first_error = std::current_exception();
            }
        });
    });
    if (first_error) std::rethrow_exception(first_error); // staged trees stay in temp/, emptied next run
    // 2. Make every rebuilt tree durable before any of them gets a package name.
    cas::sync_filesystem(objects.temp_dirfd(), s.temp_dir());
    // 3. Rename each into place without replacing anything.
    for (const auto& p : rebuild) {
        std::string stage = temp_name("rollback", p.id);
        if (::renameat2(objects.temp_dirfd(), stage.c_str(), s.root_fd(), p.name.c_str(), RENAME_NOREPLACE) != 0)
            util::throw_errno("cannot move rebuilt tree into place", s.root() + "/" + util::printable(p.name));
        ++r.rebuilt;
    }
    cas::sync_filesystem(s.root_fd(), s.root());
    // 4. Record it all in one transaction.
    catalog::Transaction tx(cat.db());
    for (const auto& p : pkgs) {
        if (p.tree != TreeState::present) cat.set_tree(p.id, TreeState::present);
        if (p.has_manifest && p.state != PackageState::rolled_back) {
            cat.set_state(p.id, PackageState::rolled_back);
            cat.journal("rollback", util::printable(p.name), catalog::to_string(p.state), "rolled_back",
                        p.tree == TreeState::removed ? "legacy tree rebuilt from the CAS" : "");
            ++r.packages;
        }
    }
    if (mode != StoreMode::legacy) {
        cat.set_mode(StoreMode::legacy);
        cat.journal("rollback", "", catalog::to_string(mode), "legacy",
                    std::to_string(r.rebuilt) + " legacy trees rebuilt");
    }
    tx.commit();
    (void)problems;
    return r;
}

// ------------------------------------------------------------------ materialize

MaterializeResult materialize(store::Store& s, const std::string& name, const std::string& dest, LinkMode link) {
    if (!s.has_catalog()) throw util::UsageError("store " + s.root() + " has no catalog yet: run casmig migrate first");
    util::ensure_dir(s.migration_dir());
    store::StoreLock reader(gc_lock_path(s), store::LockKind::shared, "materialize");
    catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
    auto p = cat.package(name);
    if (!p) throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root() + ": check the id with casmig status");
    if (!p->has_manifest)
        throw util::RefusedError("package " + util::printable(name) + " has no manifest (state " +
                                 catalog::to_string(p->state) + "): run casmig migrate " + util::printable(name) + " first");
    // DEST must not be inside the store: a tree built under objects/, temp/ or beside the packages
    // would be taken for store content (a new package, a stale temp file, a stray object). Checked by
    // identity, not by name: from DEST (or, when it does not exist yet, its parent), ".." is followed up
    // to "/", and no directory on the way may be the store's root. Symlinks in DEST are resolved as
    // the kernel resolves them for the mkdir below, so a link that leads into the store is caught too.
    {
        struct stat root_st {};
        if (::fstat(s.root_fd(), &root_st) != 0) util::throw_errno("cannot stat store", s.root());
        struct stat dst {};
        const bool dest_exists = ::stat(dest.c_str(), &dst) == 0;
        std::string anchor = dest;
        if (!dest_exists) {
            while (anchor.size() > 1 && anchor.back() == '/') anchor.pop_back();
            auto slash = anchor.rfind('/');
            anchor = slash == std::string::npos ? "." : slash == 0 ? "/" : anchor.substr(0, slash);
        }
        util::Fd at(::open(anchor.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        // A parent that cannot be opened fails the mkdir below with the real reason.
        for (struct stat cur {}; at && ::fstat(at.get(), &cur) == 0;) {
            if (cur.st_dev == root_st.st_dev && cur.st_ino == root_st.st_ino)
                throw util::UsageError("destination " + dest + " is inside store " + s.root() +
                                       ": materialize outside the store");
            util::Fd up(::openat(at.get(), "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
            struct stat up_st {};
            if (!up || ::fstat(up.get(), &up_st) != 0 || (up_st.st_dev == cur.st_dev && up_st.st_ino == cur.st_ino)) break;
            at = std::move(up);
        }
    }
    // DEST must not exist or be an empty directory.
    struct stat st {};
    if (::lstat(dest.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode)) throw util::UsageError("destination " + dest + " exists and is not a directory: choose a new path");
        util::Fd d = util::open_dir(dest);
        if (!util::list_dir(d.get(), dest).empty()) throw util::UsageError("destination " + dest + " is not empty: materialize into a new or empty directory");
    } else if (::mkdir(dest.c_str(), 0700) != 0) {
        util::throw_errno("cannot create destination", dest);
    }
    int fd = ::open(dest.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) util::throw_errno("cannot open destination", dest);
    util::Fd dfd(fd);
    // Objects are read through an ObjectStore on the store (temp/ is used for hard-link variants).
    cas::ObjectStore objects(s.objects_dir(), s.temp_dir());
    MaterializeResult r;
    detail::build_tree(dfd.get(), dest, cat.manifest(p->id), objects, link, r);
    return r;
}

// ------------------------------------------------------------------ remove

void remove_package(store::Store& s, const std::string& name) {
    s.discover();
    auto& cat = s.catalog();
    auto p = cat.package(name);
    if (!p) throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root() + ": check the id with casmig status");
    auto& objects = s.objects();
    std::string trash = temp_name("trash", p->id);
    struct stat st {};
    bool present = ::fstatat(s.root_fd(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
    if (present && ::renameat(s.root_fd(), name.c_str(), objects.temp_dirfd(), trash.c_str()) != 0)
        util::throw_errno("cannot move legacy tree aside", s.root() + "/" + util::printable(name));
    catalog::Transaction tx(cat.db());
    cat.delete_package(p->id);
    cat.journal("remove", util::printable(name), catalog::to_string(p->state), "removed",
                present ? "legacy tree deleted" : "");
    tx.commit();
    util::remove_tree_at(objects.temp_dirfd(), trash, s.temp_dir() + "/" + trash);
}

// ------------------------------------------------------------------ gc

GcResult gc(store::Store& s, DryRun dry) {
    store::StoreLock writer(gc_lock_path(s), store::LockKind::exclusive, "gc");
    auto& cat = s.catalog();
    auto& objects = s.objects();
    // Reachable: every digest a manifest refers to.
    std::unordered_set<hash::Digest, hash::DigestHash> live;
    {
        catalog::Stmt q(cat.db(), "SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL");
        while (q.step()) live.insert(hash::Digest::from_raw(q.str(0)));
    }
    GcResult r;
    std::unordered_set<hash::Digest, hash::DigestHash> dead;
    std::vector<std::string> doomed;
    for (const auto& rel : objects.list_files()) {
        auto d = rel.size() >= 65 ? hash::Digest::from_hex(rel.substr(0, 2) + rel.substr(3, 62)) : std::nullopt;
        if (!d || live.count(*d)) continue; // a file not named like an object is left alone
        struct stat st {};
        if (::fstatat(objects.dirfd(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        dead.insert(*d);
        doomed.push_back(rel);
        r.freed_bytes += static_cast<std::uint64_t>(st.st_size);
    }
    // Catalogued objects already gone from disk count as removed too (their rows are dropped).
    auto rows = cat.unreferenced_objects();
    for (const auto& o : rows) dead.insert(o.digest);
    r.removed_objects = dead.size();
    if (dry == DryRun::yes) return r;
    // Rows first, then files: either order is safe for unreferenced objects, and a crash between the
    // two leaves orphan files the next gc removes.
    catalog::Transaction tx(cat.db());
    for (const auto& d : dead) cat.delete_object(d);
    cat.journal("gc", "", "", "", std::to_string(r.removed_objects) + " objects, " + std::to_string(r.freed_bytes) + " bytes");
    tx.commit();
    for (const auto& rel : doomed)
        if (::unlinkat(objects.dirfd(), rel.c_str(), 0) != 0 && errno != ENOENT)
            util::throw_errno("cannot remove object", objects.dir() + "/" + rel);
    return r;
}

} // namespace casmig::lifecycle
