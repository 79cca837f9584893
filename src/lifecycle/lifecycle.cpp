#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/migrate/pipeline.hpp"
#include "casmig/manifest/manifest.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"
#include "materialize.hpp"
#include "xlink.hpp"

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/statvfs.h>
#include <cerrno>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <set>
#include <sys/stat.h>
#include <tbb/parallel_for_each.h>
#include <tbb/task_arena.h>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <unordered_set>

namespace casmig::lifecycle {

using catalog::PackageState;
using catalog::StoreMode;
using catalog::TreeState;

namespace {

std::string gc_lock_path(store::Store& s) { return s.migration_dir() + "/gc.lock"; }

/// Name under temp/ of a legacy tree that cleanup or remove moved aside: "trash-<id>-<16 hex>", the hex
/// being the start of BLAKE3(package name), so that recovery never takes one package's tree for
/// another's (SQLite may reuse the id of a deleted row).
std::string name_tag(const std::string& name) {
    hash::Hasher h;
    h.update(name.data(), name.size());
    return h.finish().hex().substr(0, 16);
}
std::string trash_name(const catalog::Package& p) { return "trash-" + std::to_string(p.id) + "-" + name_tag(p.name); }
std::string stage_name(const catalog::Package& p) { return "rollback-" + std::to_string(p.id); }

enum class AtName { absent, directory, other };
AtName at_name(int dirfd, const std::string& name, const std::string& display) {
    struct stat st {};
    if (!util::lstat_at(dirfd, name, st, display)) return AtName::absent;
    return S_ISDIR(st.st_mode) ? AtName::directory : AtName::other;
}

/// What deleting the tree at dirfd/name would give back (cleanup --dry-run): apparent sizes of its
/// regular files, and the blocks of each file all of whose names are in the tree.
util::FreedBytes tree_bytes(int dirfd, const std::string& name) {
    util::FreedBytes total;
    std::map<std::pair<dev_t, ino_t>, nlink_t> linked; // names seen of files with several
    // An estimate: what cannot be read counts as nothing (cleanup itself reports real problems).
    auto walk = [&](auto& self, int parent, const std::string& dir) -> void {
        util::Fd fd(::openat(parent, dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!fd) return;
        std::vector<std::string> names;
        try {
            names = util::list_dir(fd.get(), dir);
        } catch (const util::Error&) {
            return;
        }
        for (const auto& n : names) {
            struct stat st {};
            if (::fstatat(fd.get(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
            if (S_ISDIR(st.st_mode)) self(self, fd.get(), n);
            if (!S_ISREG(st.st_mode)) continue;
            total.apparent += static_cast<std::uint64_t>(st.st_size);
            if (st.st_nlink > 1 && ++linked[{st.st_dev, st.st_ino}] < st.st_nlink) continue;
            total.allocated += static_cast<std::uint64_t>(st.st_blocks) * 512;
        }
    };
    walk(walk, dirfd, name);
    return total;
}


/// What a manifest needs that only root can put back: foreign owners, file capabilities.
std::string needs_root(const std::vector<catalog::Entry>& manifest) {
    if (::geteuid() == 0) return {};
    const auto uid = ::geteuid(), gid = ::getegid();
    for (const auto& e : manifest) {
        if (e.uid != uid || e.gid != gid)
            return "'" + util::printable(e.path) + "' is owned by " + std::to_string(e.uid) + ":" + std::to_string(e.gid);
        if (e.xattrs.find("security.capability") != std::string::npos || e.xattrs.find("trusted.") != std::string::npos)
            return "'" + util::printable(e.path) + "' has file capabilities or trusted attributes";
    }
    return {};
}

/// Objects proven (re-hashed) in this run, shared by every package of the run: each object is read
/// once, and two packages never repair the same object at once.
class ObjectProver {
public:
    ObjectProver(store::Store& s, std::mutex& db_mutex) : m_s(s), m_db_mutex(db_mutex) {}

    /// "" if every object the manifest needs hashes to its name (repairing a bad one from the legacy
    /// tree at dirfd/tree when `repair_from_tree`: the caller proved that tree equals the manifest);
    /// otherwise the first problem, as "path: message".
    std::string prove(const catalog::Package& p, const std::vector<catalog::Entry>& manifest, int dirfd,
                      const std::string& tree, bool repair_from_tree, const ProblemSink& problems) {
        for (const auto& e : manifest) {
            if (e.type != catalog::EntryType::file) continue;
            if (!e.digest) return util::printable(e.path) + ": manifest entry has no object (damaged catalog)";
            auto& shard = m_shards[e.digest->raw()[0] & 63];
            std::lock_guard lk(shard.mutex);
            auto it = shard.known.find(*e.digest);
            if (it != shard.known.end() && it->second) continue;
            std::string why = verify::prove_object(m_s.objects(), *e.digest, e.size);
            if (why.empty()) {
                shard.known[*e.digest] = true;
                continue;
            }
            if (!repair_from_tree)
                return util::printable(e.path) + ": object " + e.digest->hex() + " " + why;
            std::string fixed = repair(p, e, dirfd, tree, why, problems);
            if (!fixed.empty()) return util::printable(e.path) + ": object " + e.digest->hex() + " " + why + "; " + fixed;
            shard.known[*e.digest] = true;
        }
        return {};
    }

private:
    /// Rewrites object e.digest from the legacy file (which the caller proved equal to the manifest):
    /// the bad object is quarantined in migration/corrupt/ (never deleted), the new one staged in
    /// temp/, hashed while copied, made durable, then linked into place. "" on success.
    std::string repair(const catalog::Package& p, const catalog::Entry& e, int dirfd, const std::string& tree,
                       const std::string& why, const ProblemSink& problems) {
        auto& objects = m_s.objects();
        std::string pid = util::printable(p.name);
        std::string rel = cas::object_relpath(*e.digest);
        try {
            util::Fd tfd = util::open_dir_at(dirfd, tree, tree);
            util::Fd src = util::open_beneath(tfd.get(), e.path, pid + "/" + util::printable(e.path));
            cas::TempFile tmp = objects.create_temp();
            hash::Hasher h;
            std::vector<char> buf(1 << 20);
            std::uint64_t total = 0;
            for (;;) {
                ssize_t n = ::read(src.get(), buf.data(), buf.size());
                if (n < 0 && errno == EINTR) continue;
                if (n < 0) util::throw_errno("read failed", pid + "/" + util::printable(e.path));
                if (n == 0) break;
                h.update(buf.data(), static_cast<size_t>(n));
                tmp.append_sparse(buf.data(), static_cast<size_t>(n));
                total += static_cast<std::uint64_t>(n);
            }
            if (total != e.size || h.finish() != *e.digest)
                return "the legacy file changed too; the tree is kept";
            tmp.finish();
            util::fsync_fd(tmp.fd(), "temp/" + tmp.name());
            // Quarantine the bad object: moved, never deleted.
            std::string qdir = m_s.migration_dir() + "/corrupt";
            util::ensure_dir(qdir);
            util::Fd q = util::open_dir(qdir);
            std::string qname = e.digest->hex() + "." + std::to_string(::time(nullptr));
            // Both forms go aside (the reader took the raw one first, so a bad raw file may hide a good
            // .zst one, or the .zst one was the bad one): the repaired object is raw, alone at its digest.
            if (io::renameat2(objects.dirfd(), rel.c_str(), q.get(), qname.c_str(), RENAME_NOREPLACE) != 0 && errno != ENOENT)
                util::throw_errno("cannot quarantine object", objects.dir() + "/" + rel);
            const std::string zrel = cas::object_relpath(*e.digest, cas::Form::zstd);
            if (io::renameat2(objects.dirfd(), zrel.c_str(), q.get(), (qname + ".zst").c_str(), RENAME_NOREPLACE) != 0 &&
                errno != ENOENT)
                util::throw_errno("cannot quarantine object", objects.dir() + "/" + zrel);
            util::fsync_fd(q.get(), qdir);
            std::string tname = tmp.name();
            if (io::linkat(tmp.dirfd(), tname.c_str(), objects.dirfd(), rel.c_str(), 0) != 0)
                util::throw_errno("cannot place repaired object", objects.dir() + "/" + rel);
            util::Fd fan = util::open_dir_at(objects.dirfd(), rel.substr(0, 2), objects.dir() + "/" + rel.substr(0, 2));
            util::fsync_fd(fan.get(), objects.dir() + "/" + rel.substr(0, 2));
            io::crash_point("cleanup.repaired");
            {
                std::lock_guard lk(m_db_mutex);
                auto& cat = m_s.catalog();
                catalog::Transaction tx(cat.db());
                cat.journal("cleanup", pid, "", "", "object " + e.digest->hex() + " " + why +
                                                        ": repaired from " + util::printable(e.path) +
                                                        ", bad copy in migration/corrupt/" + qname);
                tx.commit();
            }
            if (problems)
                problems({pid, util::printable(e.path),
                          "object " + e.digest->hex() + " " + why + ": repaired from this legacy file (bad copy kept in "
                          "migration/corrupt/" + qname + ")",
                          true});
            return {};
        } catch (const util::Error& err) {
            return std::string("repair failed: ") + err.what();
        }
    }

    store::Store& m_s;
    std::mutex& m_db_mutex;
    struct Shard {
        std::mutex mutex;
        std::unordered_map<hash::Digest, bool, hash::DigestHash> known;
    };
    std::array<Shard, 64> m_shards;
};

void report_tree_problems(const catalog::Package& p, const std::vector<std::pair<std::string, std::string>>& diffs,
                          const std::string& suffix, const ProblemSink& problems) {
    if (!problems) return;
    for (const auto& [path, msg] : diffs) problems({util::printable(p.name), util::printable(path), msg + suffix});
}

} // namespace

// ------------------------------------------------------------------ recovery

RecoverResult recover(store::Store& s, const ProblemSink& problems) {
    RecoverResult r;
    auto& objects = s.objects();
    std::vector<std::string> names;
    for (auto& n : util::list_dir(objects.temp_dirfd(), s.temp_dir()))
        if (n.rfind("trash-", 0) == 0 || n.rfind("rollback-", 0) == 0) names.push_back(std::move(n));
    if (names.empty()) return r;
    auto& cat = s.catalog();
    std::unordered_map<std::int64_t, catalog::Package> by_id;
    for (auto& p : cat.packages()) by_id.emplace(p.id, p);
    std::mutex db_mutex;
    ObjectProver prover(s, db_mutex);
    for (const auto& n : names) {
        std::string display = s.temp_dir() + "/" + util::printable(n);
        if (n.rfind("rollback-", 0) == 0) {
            // A tree a killed rollback was building: rebuildable from the CAS, never the only copy.
            util::remove_tree_at(objects.temp_dirfd(), n, display);
            continue;
        }
        // trash-<id>-<tag>: a legacy tree cleanup or remove moved aside.
        std::int64_t id = std::atoll(n.c_str() + 6);
        auto dash = n.find('-', 6);
        std::string tag = dash == std::string::npos ? std::string() : n.substr(dash + 1);
        auto it = by_id.find(id);
        if (it == by_id.end() || name_tag(it->second.name) != tag) {
            // No package of that name any more: `remove` recorded the removal, then was stopped.
            util::remove_tree_at(objects.temp_dirfd(), n, display);
            ++r.deleted;
            continue;
        }
        const auto& p = it->second;
        std::string pid = util::printable(p.name);
        if (p.tree == TreeState::removed && p.has_manifest) {
            // cleanup proved and recorded it removed, then was stopped while deleting (so the tree may
            // be partly gone): prove the CAS holds the package again — re-hash every object it needs,
            // repairing from what is left of the tree — then finish the deletion.
            auto manifest = cat.manifest(p.id);
            std::string bad = prover.prove(p, manifest, objects.temp_dirfd(), n, true, problems);
            if (bad.empty()) {
                util::remove_tree_at(objects.temp_dirfd(), n, display);
                ++r.deleted;
                continue;
            }
            if (problems)
                problems({pid, "", bad + "; what is left of its legacy tree (cleanup was interrupted while deleting it) "
                                   "goes back under its name: run casmig verify --objects, then rollback"});
        }
        // Not recorded removed (a stop between move-aside and record), or no longer provable: put it
        // back under its name. Never over something else.
        if (io::renameat2(objects.temp_dirfd(), n.c_str(), s.root_fd(), p.name.c_str(), RENAME_NOREPLACE) != 0) {
            if (problems)
                problems({pid, "", "its legacy tree, moved aside by an interrupted cleanup or remove, is kept at " + display +
                                       " because " + s.root() + "/" + pid + " " +
                                       (errno == EEXIST ? "is taken" : std::string("cannot be written: ") + std::strerror(errno)) +
                                       "; move it back by hand"});
            ++r.kept;
            continue;
        }
        cas::sync_filesystem(s.root_fd(), s.root());
        io::crash_point("recover.moved-back");
        catalog::Transaction tx(cat.db());
        if (p.tree == TreeState::removed) cat.set_tree(p.id, TreeState::marked);
        cat.journal("recover", pid, catalog::to_string(p.tree),
                    p.tree == TreeState::removed ? "marked" : catalog::to_string(p.tree),
                    "legacy tree moved back from " + n + " (an interrupted cleanup or remove)");
        tx.commit();
        ++r.restored;
    }
    return r;
}

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
    // Readers switch to manifests at cutover: every object they will read is re-hashed first (sizes
    // alone would let a corrupt or planted object through).
    {
        struct Need {
            std::uint64_t size;
            std::string package, path;
        };
        std::unordered_map<hash::Digest, Need, hash::DigestHash> need;
        for (const auto& p : pkgs)
            for (const auto& e : cat.manifest(p.id))
                if (e.type == catalog::EntryType::file && e.digest)
                    need.emplace(*e.digest, Need{e.size, util::printable(p.name), util::printable(e.path)});
        std::vector<std::pair<hash::Digest, Need>> list(need.begin(), need.end());
        std::mutex mutex;
        std::vector<Problem> bad;
        tbb::task_arena arena(static_cast<int>(util::thread_count(threads)));
        arena.execute([&] {
            tbb::parallel_for_each(list.begin(), list.end(), [&](const std::pair<hash::Digest, Need>& n) {
                std::string why = verify::prove_object(s.objects(), n.first, n.second.size);
                if (why.empty()) return;
                std::lock_guard lk(mutex);
                bad.push_back({n.second.package, n.second.path, "object " + n.first.hex() + " " + why});
            });
        });
        if (!bad.empty()) {
            for (const auto& b : bad)
                if (problems) problems(b);
            throw util::RefusedError(std::to_string(bad.size()) + " object(s) do not hash to their names (listed above); "
                                     "run casmig verify --objects, then migrate --retry-failed, then cutover again; "
                                     "the store is unchanged");
        }
    }
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
    io::crash_point("cutover.recorded");
    if (auto w = store::mirror_step([&] { store::record_mode(s.packages(), catalog::to_string(StoreMode::file_level)); }))
        problems({"-", "packages/store", *w, true});
    return r;
}

// ------------------------------------------------------------------ cleanup

CleanupResult cleanup(store::Store& s, DryRun dry, unsigned threads, const ProgressSink& progress,
                      const ProblemSink& problems) {
    auto& cat = s.catalog();
    if (cat.mode() != StoreMode::file_level)
        throw util::RefusedError("cleanup runs only after cutover (store mode is " + std::string(catalog::to_string(cat.mode())) +
                                 "); run casmig cutover first; nothing was deleted");
    CleanupResult r;
    struct Candidate {
        catalog::Package pkg;
        std::vector<catalog::Entry> manifest;
        bool present = false, proven = false;
        bool left = false; // not started: a stop was requested first
        std::string trash;
        std::string kept; // why its tree was kept (journaled: status and the next admin see it)
    };
    std::vector<Candidate> todo;
    for (const auto& p : cat.packages()) {
        // A package migrated and verified after cutover is cleaned up like the others.
        bool late = p.tree == TreeState::present && p.state == PackageState::verified && p.has_manifest;
        if (p.tree != TreeState::marked && !late) continue;
        if (!p.has_manifest) {
            if (problems) problems({util::printable(p.name), "", "has no manifest; its legacy tree is kept"});
            ++r.skipped;
            continue;
        }
        Candidate c;
        c.pkg = p;
        c.manifest = cat.manifest(p.id);
        c.trash = trash_name(p);
        todo.push_back(std::move(c));
    }
    // Run as non-root, a rollback could not put back foreign owners or file capabilities: refuse
    // before anything is touched.
    for (const auto& c : todo)
        if (auto why = needs_root(c.manifest); !why.empty())
            throw util::RefusedError("cleanup as a non-root user could not be undone exactly: package " +
                                     util::printable(c.pkg.name) + ": " + why +
                                     "; run casmig cleanup as root; nothing was deleted");
    Progress report;
    report.phase = dry == DryRun::yes ? "cleanup (dry run)" : "cleanup";
    report.packages_total = todo.size();
    for (auto& c : todo) c.present = at_name(s.root_fd(), c.pkg.name, s.root() + "/" + util::printable(c.pkg.name)) != AtName::absent;
    auto& objects = s.objects();
    // 1. Intent, durable before any tree moves: which trees are about to be moved aside, and where.
    if (dry == DryRun::no) {
        catalog::Transaction tx(cat.db());
        for (const auto& c : todo)
            if (c.present)
                cat.journal("cleanup", util::printable(c.pkg.name), catalog::to_string(c.pkg.tree), "",
                            "intent: move the legacy tree aside to temp/" + c.trash + ", prove it, then delete it");
        tx.commit();
        io::crash_point("cleanup.intent");
    }
    // 2. Per package, in parallel: move the tree aside (out of every reader's way, so that what is
    // proven is what is deleted), prove it equals its manifest and that every object it needs hashes
    // to its name (repairing a bad object from the proven legacy file), or put it back and report.
    std::mutex db_mutex, sink_mutex;
    ObjectProver prover(s, db_mutex);
    auto sink = [&](const Problem& p) {
        std::lock_guard lk(sink_mutex);
        if (problems) problems(p);
    };
    std::atomic<std::uint64_t> bytes{0}, allocated{0};
    tbb::task_arena arena(static_cast<int>(util::thread_count(threads)));
    arena.execute([&] {
        tbb::parallel_for_each(todo.begin(), todo.end(), [&](Candidate& c) {
            const std::string pid = util::printable(c.pkg.name);
            // A stop request: no further tree is moved; those in flight finish (proven and deleted, or
            // put back), so that temp/ holds none of this run's trees after it.
            if (util::stop_requested()) {
                c.left = true;
                return;
            }
            try {
                if (!c.present) {
                    // Nothing at its name (it vanished): nothing to delete; record it removed only if
                    // the CAS provably holds it.
                    std::string bad = prover.prove(c.pkg, c.manifest, -1, "", false, sink);
                    if (bad.empty()) c.proven = true;
                    else {
                        c.kept = "its legacy tree is gone and " + bad;
                        sink({pid, "", c.kept + "; run casmig verify --objects"});
                    }
                    return;
                }
                int from_fd = s.root_fd();
                std::string from = c.pkg.name;
                if (dry == DryRun::no) {
                    if (io::renameat2(s.root_fd(), c.pkg.name.c_str(), objects.temp_dirfd(), c.trash.c_str(), RENAME_NOREPLACE) != 0)
                        util::throw_errno("cannot move legacy tree aside", s.root() + "/" + pid);
                    io::crash_point("cleanup.moved-aside");
                    from_fd = objects.temp_dirfd();
                    from = c.trash;
                }
                auto diffs = verify::compare_tree(from_fd, from, c.pkg, c.manifest, dry == DryRun::no);
                std::string bad;
                if (diffs.empty()) bad = prover.prove(c.pkg, c.manifest, from_fd, from, dry == DryRun::no, sink);
                if (!diffs.empty() || !bad.empty()) {
                    report_tree_problems(c.pkg, diffs, "; the legacy tree is kept", sink);
                    if (!bad.empty()) sink({pid, "", bad + "; the legacy tree is kept"});
                    c.kept = !diffs.empty() ? util::printable(diffs.front().first) + ": " + diffs.front().second +
                                                  (diffs.size() > 1 ? " (and " + std::to_string(diffs.size() - 1) + " more)" : "")
                                            : bad;
                    if (dry == DryRun::no &&
                        io::renameat2(objects.temp_dirfd(), c.trash.c_str(), s.root_fd(), c.pkg.name.c_str(), RENAME_NOREPLACE) != 0)
                        util::throw_errno("cannot put legacy tree back (it stays in temp/, the next casmig run moves it back)",
                                          s.root() + "/" + pid);
                    return;
                }
                if (dry == DryRun::yes) {
                    auto b = tree_bytes(s.root_fd(), c.pkg.name);
                    bytes += b.apparent;
                    allocated += b.allocated;
                }
                c.proven = true;
            } catch (const util::Error& e) {
                c.kept = e.what();
                sink({pid, "", c.kept + "; the legacy tree is kept"});
            }
        });
    });
    for (const auto& c : todo) {
        if (c.left) ++r.left;
        else if (c.proven) ++r.trees;
        else ++r.skipped;
    }
    r.interrupted = r.left > 0;
    if (dry == DryRun::yes) {
        r.bytes = bytes.load();
        r.allocated = allocated.load();
        return r;
    }
    // The trees that could not be put back after a failed proof stay in temp/ and are not recorded.
    cas::sync_filesystem(s.root_fd(), s.root());
    io::crash_point("cleanup.proven");
    // 3. Record, then 4. delete: a stop before the record puts every tree back (recover()); after it,
    // recover() proves each moved-aside tree again and finishes deleting it.
    {
        catalog::Transaction tx(cat.db());
        for (const auto& c : todo) {
            if (!c.proven) {
                // Kept: said in the journal, not only on this run's stderr (status --journal shows it),
                // once for as long as the reason stays the same (a nightly cleanup adds no row then).
                const std::string pid = util::printable(c.pkg.name), why = "kept: " + c.kept;
                if (!c.kept.empty() && cat.last_outcome("cleanup", pid) != why)
                    cat.journal("cleanup", pid, catalog::to_string(c.pkg.tree), catalog::to_string(c.pkg.tree), why);
                continue;
            }
            cat.set_tree(c.pkg.id, TreeState::removed);
            cat.journal("cleanup", util::printable(c.pkg.name), catalog::to_string(c.pkg.tree), "removed",
                        c.present ? "proven equal to its manifest, objects re-hashed" : "legacy tree was already gone");
        }
        tx.commit();
    }
    io::crash_point("cleanup.recorded");
    std::mutex mutex;
    std::exception_ptr first_error;
    arena.execute([&] {
        tbb::parallel_for_each(todo.begin(), todo.end(), [&](Candidate& c) {
            if (!c.proven || !c.present) return;
            try {
                util::FreedBytes freed;
                util::remove_tree_at(objects.temp_dirfd(), c.trash, s.temp_dir() + "/" + c.trash, &freed);
                bytes += freed.apparent;
                allocated += freed.allocated;
                std::lock_guard lk(mutex);
                ++report.packages_done;
                if (progress) progress(report);
            } catch (...) {
                std::lock_guard lk(mutex);
                if (!first_error) first_error = std::current_exception();
            }
        });
    });
    io::crash_point("cleanup.deleted");
    if (first_error) std::rethrow_exception(first_error); // recorded removed; the next run finishes the deletion
    r.bytes = bytes.load();
    r.allocated = allocated.load();
    return r;
}

// ------------------------------------------------------------------ rollback

RollbackResult rollback(store::Store& s, unsigned threads, SpaceCheck space, const ProgressSink& progress,
                        const ProblemSink& problems) {
    auto& cat = s.catalog();
    auto& objects = s.objects();
    const auto mode = cat.mode();
    RollbackResult r;
    struct Job {
        catalog::Package pkg;
        std::vector<catalog::Entry> manifest;
        bool rebuild = false, aside = false, built = false, done = false;
        bool left = false; // to rebuild, not started: a stop was requested first
        std::string why; // of the rebuild
    };
    std::vector<Job> jobs;
    std::vector<std::string> failed;
    for (const auto& p : cat.packages()) {
        const std::string pid = util::printable(p.name);
        const std::string display = s.root() + "/" + pid;
        Job j;
        j.pkg = p;
        AtName at = at_name(s.root_fd(), p.name, display);
        if (!p.has_manifest) {
            if (p.tree == TreeState::removed || at == AtName::absent) {
                if (p.tree == TreeState::removed) {
                    if (problems) problems({pid, "", "has no legacy tree and no manifest: it cannot be rebuilt; restore it "
                                                     "from a backup or casmig remove it"});
                    failed.push_back(pid);
                }
            }
            continue;
        }
        j.manifest = cat.manifest(p.id);
        if (at == AtName::absent) {
            j.rebuild = true;
            j.why = p.tree == TreeState::removed ? "removed by cleanup" : "its legacy tree vanished";
        } else if (at == AtName::other) {
            j.rebuild = j.aside = true;
            j.why = "something that is not a directory is at its name";
        } else if (p.tree == TreeState::removed || mode == StoreMode::file_level) {
            // Trust nothing at a package's name: after cleanup a directory there is either the tree a
            // stopped rollback put in place (then it is exact) or foreign; after cutover the manifest is
            // the truth and a legacy tree that drifted is not what readers saw.
            auto diffs = verify::compare_tree(s.root_fd(), p.name, p, j.manifest);
            if (!diffs.empty()) {
                j.rebuild = j.aside = true;
                j.why = "'" + util::printable(diffs[0].first) + "' " + diffs[0].second;
            }
        }
        if (j.rebuild) {
            if (auto why = needs_root(j.manifest); !why.empty())
                throw util::RefusedError("rollback as a non-root user cannot rebuild package " + pid + " exactly: " + why +
                                         "; run casmig rollback as root; the store is unchanged");
        }
        jobs.push_back(std::move(j));
    }
    // Space first: a rollback that stops half-way for want of space helps nobody.
    // A file costs what its object has allocated (a sparse object less than its size, copies keep the
    // holes), at most its size; a hard link inside a package costs nothing.
    std::uint64_t need = 0;
    std::unordered_map<hash::Digest, std::uint64_t, hash::DigestHash> cost;
    for (const auto& j : jobs) {
        if (!j.rebuild) continue;
        need += 4096 * (j.manifest.size() + 1);
        for (const auto& e : j.manifest) {
            if (e.type != catalog::EntryType::file || e.link_to || !e.digest) continue;
            auto [it, fresh] = cost.emplace(*e.digest, e.size);
            struct stat st {};
            if (fresh && ::fstatat(objects.dirfd(), cas::object_relpath(*e.digest).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0)
                it->second = std::min(e.size, static_cast<std::uint64_t>(st.st_blocks) * 512);
            need += it->second;
        }
    }
    struct statvfs vfs {};
    if (space == SpaceCheck::yes && need && ::fstatvfs(s.root_fd(), &vfs) == 0) {
        std::uint64_t free_bytes = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
        if (need > free_bytes)
            throw util::RefusedError("rollback needs about " + util::human_bytes(static_cast<double>(need)) + " to rebuild " +
                                     "legacy trees but " + s.root() + " has " + util::human_bytes(static_cast<double>(free_bytes)) +
                                     " free; free space (or pass --no-space-check if the filesystem shares blocks), then "
                                     "rollback again; the store is unchanged");
    }
    // 1. Build every tree to rebuild in temp/, in parallel, exactly from its manifest.
    Progress report;
    report.phase = "rollback";
    for (const auto& j : jobs) report.packages_total += j.rebuild;
    std::mutex mutex, db_mutex;
    // Objects are re-hashed before a tree is built from them: a corrupt object would otherwise come
    // back as a legacy file with the wrong bytes, silently.
    ObjectProver prover(s, db_mutex);
    tbb::task_arena arena(static_cast<int>(util::thread_count(threads)));
    arena.execute([&] {
        tbb::parallel_for_each(jobs.begin(), jobs.end(), [&](Job& j) {
            if (!j.rebuild) return;
            // A stop request: no further tree is built; those built are put in place and recorded.
            if (util::stop_requested()) {
                j.left = true;
                return;
            }
            const std::string pid = util::printable(j.pkg.name);
            std::string stage = stage_name(j.pkg);
            try {
                if (std::string bad = prover.prove(j.pkg, j.manifest, -1, "", false, nullptr); !bad.empty())
                    throw util::Error(bad + "; restore that object from a backup (casmig verify --objects names "
                                            "every bad one), then rollback again");
                util::remove_tree_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
                if (io::mkdirat(objects.temp_dirfd(), stage.c_str(), 0700) != 0)
                    util::throw_errno("cannot create staging directory", s.temp_dir() + "/" + stage);
                util::Fd fd = util::open_dir_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
                MaterializeResult mr;
                detail::build_tree(fd.get(), s.root() + "/" + pid, j.manifest, objects, LinkMode::reflink, mr);
                io::crash_point("rollback.staged"); // built in temp/, not durable yet: recover() deletes it
                j.built = true;
                std::lock_guard lk(mutex);
                r.files += mr.files;
                r.bytes += mr.bytes;
                ++report.packages_done;
                report.files_done += mr.files;
                report.bytes_done += mr.bytes;
                if (progress) progress(report);
            } catch (const std::exception& e) {
                std::lock_guard lk(mutex);
                if (problems) problems({pid, "", std::string("cannot be rebuilt: ") + e.what()});
                try {
                    util::remove_tree_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
                } catch (const util::Error&) {
                }
            }
        });
    });
    // 1b. Hard links across packages (catalog::Entry::xlink): a rebuilt file becomes a link of the same
    // file in another package's tree (in place, or rebuilt above), once that file is proven equal.
    {
        std::vector<detail::LinkTree> trees;
        std::vector<Job*> owner;
        for (auto& j : jobs) {
            const std::string pid = util::printable(j.pkg.name);
            if (j.built) {
                trees.push_back({&j.pkg, &j.manifest, objects.temp_dirfd(), stage_name(j.pkg), s.root() + "/" + pid, true});
            } else if (!j.rebuild && at_name(s.root_fd(), j.pkg.name, s.root() + "/" + pid) == AtName::directory) {
                trees.push_back({&j.pkg, &j.manifest, s.root_fd(), j.pkg.name, s.root() + "/" + pid, false});
            } else {
                continue;
            }
            owner.push_back(&j);
        }
        auto linked = detail::link_across(trees, problems);
        r.linked_across = linked.linked;
        for (size_t i : linked.failed) {
            Job& j = *owner[i];
            j.built = false; // reported by link_across; rebuilt by the next rollback
            std::string stage = stage_name(j.pkg);
            try {
                util::remove_tree_at(objects.temp_dirfd(), stage, s.temp_dir() + "/" + stage);
            } catch (const util::Error&) {
                // Dropped on purpose: a rollback-* tree left in temp/ is deleted by the next run's recover().
            }
        }
        io::crash_point("rollback.linked");
    }
    // 2. Every rebuilt tree is durable before any of them gets a package name.
    cas::sync_filesystem(objects.temp_dirfd(), s.temp_dir());
    io::crash_point("rollback.built");
    // 3. Move anything foreign aside (never deleted), then each tree into place, without replacing.
    std::string aside_dir = s.migration_dir() + "/aside";
    for (auto& j : jobs) {
        if (!j.rebuild) {
            j.done = true;
            continue;
        }
        const std::string pid = util::printable(j.pkg.name);
        if (j.left) {
            ++r.left;
            continue;
        }
        if (!j.built) {
            failed.push_back(pid);
            continue;
        }
        try {
            if (j.aside && at_name(s.root_fd(), j.pkg.name, s.root() + "/" + pid) != AtName::absent) {
                util::ensure_dir(aside_dir, 0700);
                util::Fd a = util::open_dir(aside_dir);
                std::string an = (j.pkg.name.size() <= 200 ? j.pkg.name : "package-" + std::to_string(j.pkg.id)) + "." +
                                 std::to_string(::time(nullptr));
                if (io::renameat2(s.root_fd(), j.pkg.name.c_str(), a.get(), an.c_str(), RENAME_NOREPLACE) != 0)
                    util::throw_errno("cannot move aside what is at", s.root() + "/" + pid);
                util::fsync_fd(a.get(), aside_dir);
                io::crash_point("rollback.moved-aside");
                if (problems)
                    problems({pid, "", "what was at its name (" + j.why + ") is kept at " + aside_dir + "/" +
                                           util::printable(an) + "; the package was rebuilt from the CAS",
                              true});
                catalog::Transaction tx(cat.db());
                cat.journal("rollback", pid, "", "", "moved aside to migration/aside/" + util::printable(an) + ": " + j.why);
                tx.commit();
            }
            std::string stage = stage_name(j.pkg);
            if (io::renameat2(objects.temp_dirfd(), stage.c_str(), s.root_fd(), j.pkg.name.c_str(), RENAME_NOREPLACE) != 0)
                util::throw_errno("cannot move rebuilt tree into place", s.root() + "/" + pid);
            io::crash_point("rollback.renamed");
            j.done = true;
            ++r.rebuilt;
        } catch (const util::Error& e) {
            if (problems) problems({pid, "", std::string(e.what()) + "; not restored"});
            failed.push_back(pid);
        }
    }
    cas::sync_filesystem(s.root_fd(), s.root());
    io::crash_point("rollback.synced");
    // 4. Record what is now true, package by package; the store is legacy again only when every
    // package is back.
    catalog::Transaction tx(cat.db());
    for (const auto& j : jobs) {
        if (!j.done) continue;
        const auto& p = j.pkg;
        if (p.tree != TreeState::present) cat.set_tree(p.id, TreeState::present);
        if (p.state != PackageState::rolled_back) {
            cat.set_state(p.id, PackageState::rolled_back);
            cat.journal("rollback", util::printable(p.name), catalog::to_string(p.state), "rolled_back",
                        j.rebuild ? "legacy tree rebuilt from the CAS (" + j.why + ")" : "");
            ++r.packages;
        }
    }
    r.failed = failed.size();
    r.interrupted = r.left > 0;
    const bool all_back = failed.empty() && !r.interrupted;
    if (all_back && mode != StoreMode::legacy) {
        cat.set_mode(StoreMode::legacy);
        cat.journal("rollback", "", catalog::to_string(mode), "legacy", std::to_string(r.rebuilt) + " legacy trees rebuilt");
    }
    tx.commit();
    io::crash_point("rollback.recorded");
    if (all_back && mode != StoreMode::legacy)
        if (auto w = store::mirror_step([&] { store::record_mode(s.packages(), catalog::to_string(StoreMode::legacy)); }))
            problems({"-", "packages/store", *w, true});
    return r;
}

// ------------------------------------------------------------------ materialize

MaterializeResult materialize(store::Store& s, const std::string& name, const std::string& dest, LinkMode link) {
    if (!s.has_catalog()) throw util::UsageError("store " + s.root() + " has no catalog yet: run casmig migrate first");
    util::ensure_dir(s.migration_dir());
    store::StoreLock reader(gc_lock_path(s), store::LockKind::shared, "materialize", s.lock_wait());
    catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
    auto p = cat.package(name);
    if (!p) throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root() + ": check the id with casmig list");
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
    // Objects are read through an ObjectStore (its own locked staging directory in temp/ holds hard-link
    // variants being made); made before DEST so that a refused temp/ leaves nothing behind.
    cas::ObjectStore objects(s.objects_dir(), s.temp_dir());
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
    MaterializeResult r;
    detail::build_tree(dfd.get(), dest, cat.manifest(p->id), objects, link, r);
    return r;
}

// ------------------------------------------------------------------ remove

std::optional<std::string> remove_package(store::Store& s, const std::string& name) {
    s.discover();
    auto& cat = s.catalog();
    auto p = cat.package(name);
    if (!p) throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root() + ": check the id with casmig list");
    auto& objects = s.objects();
    const std::string pid = util::printable(name);
    std::string trash = trash_name(*p);
    bool present = at_name(s.root_fd(), name, s.root() + "/" + pid) != AtName::absent;
    // Intent, then move aside, then record, then delete: a stop before the record puts the tree back.
    if (present) {
        catalog::Transaction tx(cat.db());
        cat.journal("remove", pid, catalog::to_string(p->state), "", "intent: move the legacy tree aside to temp/" + trash);
        tx.commit();
        if (io::renameat2(s.root_fd(), name.c_str(), objects.temp_dirfd(), trash.c_str(), RENAME_NOREPLACE) != 0)
            util::throw_errno("cannot move legacy tree aside", s.root() + "/" + pid);
        io::crash_point("remove.moved-aside");
    }
    // The ref goes before the catalog row: a stop between the two leaves the package in the catalog,
    // whose next command writes the ref again (and puts the tree back); the other order left a ref
    // naming a removed package, which rebuild-catalog would bring back if the catalog were lost then.
    // A ref that cannot be dropped here is dropped by the next command's sync (the catalog decides).
    auto warning = store::mirror_step([&] { s.packages().drop_ref(name); });
    {
        catalog::Transaction tx(cat.db());
        cat.delete_package(p->id);
        cat.journal("remove", pid, catalog::to_string(p->state), "removed", present ? "legacy tree deleted" : "");
        tx.commit();
    }
    io::crash_point("remove.recorded");
    util::remove_tree_at(objects.temp_dirfd(), trash, s.temp_dir() + "/" + trash);
    return warning;
}

// ------------------------------------------------------------------ packages/ follows the catalog

namespace {

/// Stages package n's ref naming manifest object d (the catalog's); when that object is missing or
/// damaged, the manifest is encoded again from the catalog's rows and staged with it. False when the
/// rows no longer encode to d (nothing staged; verify --objects reports the package).
bool stage_ref_from_catalog(catalog::Catalog& cat, store::PackageIndex& index, const std::string& n, const hash::Digest& d) {
    try {
        index.read_manifest(d);
        index.stage_ref(n, d);
        return true;
    } catch (const util::SystemError&) {
        throw;
    } catch (const util::Error&) {
    }
    auto p = cat.package(n);
    if (!p) return false;
    auto entries = cat.manifest(p->id);
    manifest::normalize(entries);
    std::string enc = manifest::encode(entries);
    if (manifest::digest_of(enc) != d) return false;
    index.stage(n, enc, d);
    return true;
}

} // namespace

StatusReport status(store::Store& s, int journal_lines) {
    s.check_catalog(store::Purpose::read, "status");
    StatusReport r;
    r.states = {{"pending", 0}, {"in_progress", 0}, {"migrated", 0}, {"verified", 0}, {"failed", 0}, {"rolled_back", 0}};
    r.trees = {{"present", 0}, {"marked", 0}, {"removed", 0}};
    auto legacy = s.legacy_dirs();
    std::set<std::string> on_disk(legacy.begin(), legacy.end());
    if (s.has_catalog()) {
        // Read-only, no lock: status never blocks and never writes (WAL readers see the last commit).
        catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
        r.mode = catalog::to_string(cat.mode());
        for (const auto& p : cat.packages()) {
            if (vanished_unmigrated(p, on_disk.erase(p.name) > 0)) continue; // the next locked command drops it
            ++r.total;
            ++r.states[catalog::to_string(p.state)];
            ++r.trees[catalog::to_string(p.tree)];
            if (p.state == PackageState::failed) r.failures.emplace_back(util::printable(p.name), p.error);
            if (!p.verify_error.empty())
                r.verify_failures.push_back({util::printable(p.name), p.verify_error, p.verify_failed_at_ns});
        }
        r.totals = cat.totals();
        if (auto z = store::read_compression(cat)) r.compression = z->setting();
        r.journal = cat.journal_tail(journal_lines);
        // The last migrate run, from its journal rows: when, how much, how fast.
        auto& lr = r.last_migrate;
        for (const auto& row : cat.last_run("migrate")) {
            if (!lr.found) lr.started_ns = row.at_ns, lr.who = row.who;
            lr.found = true;
            lr.ended_ns = row.at_ns;
            if (row.to == "failed") ++lr.failed;
            if (row.detail.rfind(migrate::k_run_ended, 0) == 0) {
                std::string rest = row.detail.substr(std::strlen(migrate::k_run_ended));
                const auto semi = rest.find("; started_ns ");
                lr.result = rest.substr(0, semi);
                if (semi != std::string::npos) {
                    long long s = 0;
                    if (std::sscanf(rest.c_str() + semi, "; started_ns %lld", &s) == 1 && s > 0 && s < lr.started_ns)
                        lr.started_ns = s;
                }
            }
            if (row.to != "migrated") continue;
            ++lr.migrated;
            unsigned long long f = 0, b = 0;
            if (std::sscanf(row.detail.c_str(), "%llu files, %llu bytes", &f, &b) == 2) lr.files += f, lr.bytes += b;
        }
    }
    // Legacy directories the catalog does not know yet: pending, present.
    r.total += on_disk.size();
    r.states["pending"] += on_disk.size();
    r.trees["present"] += on_disk.size();
    const auto& lr = r.last_migrate;
    const std::uint64_t pending = r.states["pending"] + r.states["rolled_back"] + r.states["in_progress"];
    // A pace from a run of under a second (a few packages, or cut short) says nothing about the rest.
    if (lr.migrated && lr.ended_ns - lr.started_ns >= 1'000'000'000 && pending)
        r.eta_seconds = static_cast<double>(lr.ended_ns - lr.started_ns) / 1e9 / static_cast<double>(lr.migrated) *
                        static_cast<double>(pending);
    else if (!pending)
        r.eta_seconds = 0;
    r.lock_holder = lock_holder(s);
    return r;
}

std::unique_ptr<store::StoreLock> lock_store(store::Store& s, const std::string& command, store::Purpose purpose,
                                             const ProblemSink& problems, const std::function<void(const std::string&)>& warn) {
    auto l = s.lock(command, purpose); // checks that the catalog belongs to the store first
    recover(s, problems);
    if (auto w = store::mirror_step([&] { sync_packages(s); }); w && warn) warn(*w);
    return l;
}

SyncResult sync_packages(store::Store& s) {
    SyncResult r;
    auto& cat = s.catalog();
    auto& index = s.packages();
    // Packages recorded by a catalog from before schema 0003 (or whose manifest object a damaged store
    // lost): their manifest goes into packages/ now, durable before the catalog names it.
    std::vector<std::pair<std::int64_t, hash::Digest>> written;
    for (const auto& p : cat.packages()) {
        if (!p.has_manifest || p.manifest_object) continue;
        auto entries = cat.manifest(p.id);
        manifest::normalize(entries);
        std::string enc = manifest::encode(entries);
        auto d = manifest::digest_of(enc);
        index.stage(p.name, enc, d);
        written.emplace_back(p.id, d);
    }
    if (!written.empty()) {
        index.publish();
        catalog::Transaction tx(cat.db());
        for (const auto& [id, d] : written) cat.set_manifest_object(id, d);
        cat.journal("casmig", "", "", "", std::to_string(written.size()) + " manifests written into packages/");
        tx.commit();
        io::crash_point("packages.backfilled");
        r.manifests_written = written.size();
    }
    // Refs of packages the catalog does not hold, or holds without a manifest (a stop between a commit
    // and the ref's removal): the catalog decides. Listing refs/ costs one directory read.
    // A ref the catalog names but refs/ lacks (deleted by hand, lost to a crash) is written again: a
    // lost catalog must not find a package without its ref.
    {
        std::unordered_map<std::string, hash::Digest> with_manifest;
        for (const auto& p : cat.packages())
            if (p.has_manifest && p.manifest_object) with_manifest.emplace(p.name, *p.manifest_object);
        std::unordered_set<std::string> present;
        for (const auto& n : index.ref_names()) {
            present.insert(n);
            if (!with_manifest.count(n)) {
                index.drop_ref(n);
                ++r.refs_dropped;
            }
        }
        bool staged = false;
        for (const auto& [n, d] : with_manifest) {
            if (present.count(n)) continue;
            if (!stage_ref_from_catalog(cat, index, n, d)) continue; // verify --objects reports it
            staged = true;
            ++r.refs_restored;
        }
        if (staged) index.publish();
    }
    // The store mode, mirrored for rebuild-catalog (a stop between a mode change and its mirror).
    std::string mode = catalog::to_string(cat.mode());
    std::map<std::string, std::string> settings;
    bool damaged = false;
    try {
        settings = index.settings();
    } catch (const util::SystemError&) {
        throw;
    } catch (const util::Error&) {
        damaged = true; // record_mode() moves it aside and writes it anew
    }
    auto it = settings.find("mode");
    if (damaged || (it == settings.end() ? mode != catalog::to_string(StoreMode::legacy) : it->second != mode)) {
        store::record_mode(index, mode);
        r.mode_written = true;
    }
    // The zstd mode (and the dictionary it names), mirrored the same way.
    if (auto c = store::read_compression(cat)) {
        auto ct = settings.find("compression");
        if (damaged || ct == settings.end() || ct->second != c->setting()) index.set_setting("compression", c->setting());
    } else if (settings.count("compression")) {
        index.erase_setting("compression"); // convert --raw stopped between the catalog and the mirror
    }
    return r;
}

// ------------------------------------------------------------------ gc

namespace {

/// A forward cursor over the 32-byte digests a query returns in ascending order.
class DigestCursor {
public:
    DigestCursor(catalog::Db& db, const std::string& sql, const std::string& display) : m_q(db, sql), m_display(display) {
        advance();
    }
    const std::optional<std::string>& head() const { return m_head; }
    void advance() {
        m_head.reset();
        if (!m_q.step()) return;
        std::string raw = m_q.str(0);
        if (raw.size() != 32)
            throw util::RefusedError("catalog " + m_display + " holds a damaged object digest: run casmig verify --objects, "
                                     "or casmig rebuild-catalog");
        m_head = std::move(raw);
    }

private:
    catalog::Stmt m_q;
    std::string m_display;
    std::optional<std::string> m_head;
};

} // namespace

GcResult gc(store::Store& s, DryRun dry) {
    store::StoreLock writer(gc_lock_path(s), store::LockKind::exclusive, "gc", s.lock_wait());
    auto& cat = s.catalog();
    auto& objects = s.objects();
    GcResult r;
    // Memory independent of the store's size (issue 9): a sort-merge, one fan-out directory of objects/
    // at a time, against two ascending cursors of one read snapshot of the catalog: the digests the
    // manifests reference (sorted by SQLite, spilling to temporary files, not into memory) and the
    // catalogued objects. An object is dead when neither cursor's reference set holds it: its catalog
    // row goes first (committed per shard), then its files, so that a stop in between leaves orphan
    // files, never a row for a file that is gone (migrate trusts rows). gc holds the store lock: no
    // reference is added meanwhile.
    catalog::Catalog snap(s.db_path(), catalog::OpenMode::read_only);
    snap.db().exec("PRAGMA temp_store=FILE");
    snap.db().exec("BEGIN"); // one snapshot for both cursors
    DigestCursor refs(snap.db(), "SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL ORDER BY digest", s.db_path());
    DigestCursor rows(snap.db(), "SELECT digest FROM objects ORDER BY digest", s.db_path());
    // Everything with a first byte below `limit` (0x100: everything left): rows and files of one shard.
    auto settle = [&](unsigned limit, const std::vector<std::string>& names) {
        auto below = [&](const std::optional<std::string>& h) {
            return h && static_cast<unsigned char>((*h)[0]) < limit;
        };
        // Files of this shard by digest (variants share it); names not shaped like an object are left alone.
        std::vector<std::pair<std::string, std::string>> files; // (raw digest, relative name)
        for (const auto& rel : names) {
            auto d = rel.size() >= 65 ? hash::Digest::from_hex(rel.substr(0, 2) + rel.substr(3, 62)) : std::nullopt;
            if (!d || d->hex() != rel.substr(0, 2) + rel.substr(3, 62)) continue;
            files.emplace_back(d->raw(), rel);
        }
        std::sort(files.begin(), files.end());
        std::vector<std::string> dead_rows;
        std::vector<std::string> doomed;
        size_t fi = 0;
        std::string prev_dead;
        for (;;) {
            // The smallest digest still to decide among rows and files.
            std::optional<std::string> next;
            if (below(rows.head())) next = *rows.head();
            if (fi < files.size() && (!next || files[fi].first < *next)) next = files[fi].first;
            if (!next) break;
            while (refs.head() && *refs.head() < *next) refs.advance();
            const bool live = refs.head() && *refs.head() == *next;
            bool counted = false;
            if (rows.head() && *rows.head() == *next) {
                if (!live) {
                    dead_rows.push_back(*next);
                    counted = true;
                }
                rows.advance();
            }
            for (; fi < files.size() && files[fi].first == *next; ++fi) {
                if (live) continue;
                struct stat st {};
                if (::fstatat(objects.dirfd(), files[fi].second.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
                r.freed_bytes += static_cast<std::uint64_t>(st.st_size);
                doomed.push_back(files[fi].second);
                counted = true;
            }
            if (counted) ++r.removed_objects;
        }
        if (dry == DryRun::yes) return;
        if (!dead_rows.empty()) {
            catalog::Transaction tx(cat.db());
            for (const auto& d : dead_rows) cat.delete_object(hash::Digest::from_raw(d));
            tx.commit();
            io::crash_point("gc.recorded");
        }
        for (const auto& rel : doomed) {
            if (io::unlinkat(objects.dirfd(), rel.c_str(), 0) != 0 && errno != ENOENT)
                util::throw_errno("cannot remove object", objects.dir() + "/" + rel);
            io::crash_point("gc.unlinked");
        }
    };
    objects.for_each_shard([&](const std::vector<std::string>& names) {
        if (names.empty()) return;
        const unsigned shard = static_cast<unsigned>(std::stoul(names.front().substr(0, 2), nullptr, 16));
        settle(shard, {});        // rows of shards that have no directory
        settle(shard + 1, names); // this shard
    });
    settle(0x100, {}); // rows after the last directory
    snap.db().exec("COMMIT");
    if (dry == DryRun::no && r.removed_objects) {
        catalog::Transaction tx(cat.db());
        cat.journal("gc", "", "", "", std::to_string(r.removed_objects) + " objects, " + std::to_string(r.freed_bytes) + " bytes");
        tx.commit();
    }
    // packages/ follows the catalog: refs of packages it does not hold (a stop between a catalog commit
    // and the ref's removal) go, and so do manifest objects no package of the catalog names.
    auto& index = s.packages();
    std::unordered_map<std::string, std::optional<hash::Digest>> current;
    for (const auto& p : cat.packages()) current.emplace(p.name, p.has_manifest ? p.manifest_object : std::nullopt);
    std::vector<std::string> stale_refs;
    for (const auto& n : index.ref_names()) {
        auto it = current.find(n);
        if (it == current.end() || !it->second) stale_refs.push_back(n);
    }
    // A ref naming another manifest than the catalog's (a stop between placing refs and the catalog
    // commit that would have named them) is put back to the catalog's.
    std::vector<std::pair<std::string, hash::Digest>> wrong_refs;
    for (const auto& [n, d] : current) {
        if (!d) continue;
        std::optional<hash::Digest> on_disk;
        try {
            on_disk = index.ref(n);
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error&) {
            // damaged: rewritten below
        }
        if (on_disk != d) wrong_refs.emplace_back(n, *d);
    }
    r.fixed_refs = wrong_refs.size();
    std::unordered_set<hash::Digest, hash::DigestHash> live_manifests;
    for (const auto& [n, d] : current)
        if (d) live_manifests.insert(*d);
    std::vector<hash::Digest> dead_manifests;
    for (const auto& d : index.manifest_objects())
        if (!live_manifests.count(d)) dead_manifests.push_back(d);
    r.removed_manifests = dead_manifests.size();
    r.removed_refs = stale_refs.size();
    if (dry == DryRun::yes) return r;
    for (const auto& n : stale_refs) index.drop_ref(n);
    if (!wrong_refs.empty()) {
        for (const auto& [n, d] : wrong_refs) {
            if (!stage_ref_from_catalog(cat, index, n, d))
                throw util::Error("package " + util::printable(n) + ": the catalog's manifest does not encode to its recorded "
                                  "manifest object " + d.hex() + ": run casmig verify --objects");
        }
        index.publish();
    }
    for (const auto& d : dead_manifests) index.delete_manifest(d);
    return r;
}

} // namespace casmig::lifecycle
