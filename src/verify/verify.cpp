#include "casmig/verify/verify.hpp"

#include "casmig/manifest/manifest.hpp"
#include "casmig/store/packages.hpp"

#include "casmig/ingest/ingest.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/walk/walker.hpp"

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <algorithm>
#include <map>
#include <sys/stat.h>
#include <mutex>
#include <tbb/parallel_for_each.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#include <thread>
#include <unistd.h>
#include <unordered_map>

namespace casmig::verify {

using catalog::EntryType;
using catalog::PackageState;

namespace {

constexpr size_t k_max_problems_per_package = 20;

const char* type_name(EntryType t) {
    switch (t) {
    case EntryType::file: return "file";
    case EntryType::dir: return "directory";
    case EntryType::symlink: return "symlink";
    }
    return "?";
}

std::string octal(std::uint32_t m) {
    char b[16];
    std::snprintf(b, sizeof b, "%04o", m);
    return b;
}

struct Task {
    catalog::Package pkg;
    std::vector<catalog::Entry> manifest;
    std::vector<std::int64_t> stored; // per manifest entry: its object's stored size in the catalog, or -1
    std::vector<std::pair<std::string, std::string>> problems; // path, message
    std::vector<hash::Digest> missing_objects;
    std::uint64_t files_read = 0, files_by_identity = 0;
    void add(const std::string& path, const std::string& msg) {
        if (problems.size() < k_max_problems_per_package) problems.emplace_back(path, msg);
        else if (problems.size() == k_max_problems_per_package)
            problems.emplace_back("", "more problems not shown (limit " + std::to_string(k_max_problems_per_package) + ")");
    }
};

/// The objects one verify call found in place by their lstat (check_objects()), with the size the
/// manifest entry gave (an entry whose size does not fit its object is still looked at, and reported):
/// a content many packages share is looked at once per call. Bounded: past k_max entries it starts
/// over (memory stays flat however large the store; a digest forgotten is only looked at again).
class SeenObjects {
public:
    bool contains(const hash::Digest& d, std::uint64_t size) {
        std::lock_guard lk(m_mutex);
        auto it = m_map.find(d);
        return it != m_map.end() && it->second == size;
    }
    void insert(const hash::Digest& d, std::uint64_t size) {
        std::lock_guard lk(m_mutex);
        if (m_map.size() >= k_max) m_map.clear();
        m_map[d] = size;
    }

private:
    static constexpr size_t k_max = 1 << 16;
    std::mutex m_mutex;
    std::unordered_map<hash::Digest, std::uint64_t, hash::DigestHash> m_map;
};

void check_objects(Task& t, const cas::ObjectStore& objects, SeenObjects& seen) {
    for (size_t i = 0; i < t.manifest.size(); ++i) {
        const auto& e = t.manifest[i];
        if (e.type != EntryType::file || !e.digest) continue;
        // The catalog's row names the form and the bytes on disk: one lstat proves the object there
        // and whole (the content itself is verify --objects' to prove). Otherwise the full look below.
        if (i < t.stored.size() && t.stored[i] >= 0) {
            if (seen.contains(*e.digest, e.size)) continue;
            if (objects.has_stored(*e.digest, e.size, static_cast<std::uint64_t>(t.stored[i]))) {
                seen.insert(*e.digest, e.size);
                continue;
            }
        }
        std::uint64_t size = 0;
        if (!objects.on_disk(*e.digest, &size)) {
            t.add(e.path, "object " + e.digest->hex() + " is missing from objects/");
            t.missing_objects.push_back(*e.digest);
        }
        else if (size == UINT64_MAX)
            t.add(e.path, "object " + e.digest->hex() + " is a .zst file without a valid zstd frame header");
        else if (size != e.size)
            t.add(e.path, "object " + e.digest->hex() + " has " + std::to_string(size) + " bytes, the manifest says " +
                              std::to_string(e.size));
    }
}

// Files are opened and read ahead in groups (ingest::read_ahead_files() of them), then hashed one by
// one: on a cold cache the disk gets a whole group at once (the same as migrate's ingest stage).

struct PendingFile {
    walk::Item item;
    const catalog::Entry* manifest;
};

/// Hashes each pending legacy file, compares it with its manifest entry and clears the list.
void hash_files(Task& t, std::vector<PendingFile>& files) {
    t.files_read += files.size();
    // The caller bounds the group (read_ahead) and the directories it keeps open.
    std::vector<util::Fd> fds = ingest::open_ahead(files.size(), files.size(), [&](size_t i) { return &files[i].item; });
    for (size_t i = 0; i < files.size(); ++i) {
        const std::string& path = files[i].item.entry.path;
        const catalog::Entry& m = *files[i].manifest;
        try {
            if (!fds[i]) fds[i] = ingest::open_item(files[i].item);
            auto r = ingest::ingest_open(files[i].item, std::move(fds[i]), nullptr, ingest::StoreObject::no, nullptr);
            if (!m.digest || r.digest != *m.digest)
                t.add(path, "content differs: manifest " + (m.digest ? m.digest->hex() : std::string("none")) +
                                ", legacy tree " + r.digest.hex());
            if (r.xattrs != m.xattrs) t.add(path, "extended attributes differ from the manifest");
        } catch (const walk::PackageError& e) {
            t.add(path, e.what());
        }
    }
    files.clear();
}

std::string ns_time(std::int64_t ns) {
    char b[48];
    std::snprintf(b, sizeof b, "%lld.%09lld", static_cast<long long>(ns / 1'000'000'000),
                  static_cast<long long>(ns % 1'000'000'000));
    return b;
}

/// Compares the tree at dirfd/name with t.manifest. `moved`: the tree was renamed aside by cleanup
/// (its root's mtime and ctime moved with the rename; everything below must still be exact).
/// `known`: the package as migrate's ingest just found it (Options::known), or null.
void check_tree(Task& t, int store_fd, const std::string& name, size_t read_ahead, size_t max_dirs, bool moved = false,
                const KnownTree* known = nullptr) {
    // By path: the identity ingest recorded and the entry it made (its digest and xattrs).
    std::unordered_map<std::string_view, std::pair<const FileIdentity*, const catalog::Entry*>> ingested;
    if (known && known->files && known->entries) {
        ingested.reserve(known->files->size());
        for (const auto& [path, id] : *known->files) ingested.emplace(path, std::make_pair(&id, nullptr));
        for (const auto& e : *known->entries)
            if (auto f = ingested.find(e.path); f != ingested.end()) f->second.second = &e;
    }
    std::vector<PendingFile> files;
    size_t dirs = 0; // directories the pending files keep open (at most max_dirs)
    std::unordered_map<std::string, const catalog::Entry*> want;
    want.reserve(t.manifest.size());
    for (const auto& e : t.manifest) want.emplace(e.path, &e);
    size_t seen = 0;
    std::vector<std::string> walked_files;                         // files both sides have
    std::vector<std::pair<std::string, std::string>> walked_links; // path -> the path the walk met it at first
    try {
        walk::PackageWalker w(store_fd, name);
        walk::Item it;
        for (;;) {
            try {
                if (!w.next(it)) break;
            } catch (const walk::PackageError& e) {
                // The walker has already stepped past the bad entry: report it and keep walking.
                t.add(e.path(), e.what());
                continue;
            }
            const std::string& path = it.entry.path;
            auto f = want.find(path);
            if (f == want.end()) {
                t.add(path, std::string("is in the legacy tree but not in the manifest (a ") + type_name(it.entry.type) +
                                " added after migration)");
                continue;
            }
            ++seen;
            const catalog::Entry& m = *f->second;
            if (m.type != it.entry.type) {
                t.add(path, std::string("type differs: manifest ") + type_name(m.type) + ", legacy tree " +
                                type_name(it.entry.type));
                continue;
            }
            if (m.type != EntryType::symlink && m.mode != it.entry.mode)
                t.add(path, "mode differs: manifest " + octal(m.mode) + ", legacy tree " + octal(it.entry.mode));
            if (m.type == EntryType::dir && m.xattrs != it.entry.xattrs)
                t.add(path, "extended attributes differ from the manifest");
            if (m.type == EntryType::symlink && m.target != it.entry.target)
                t.add(path, "symlink target differs: manifest '" + util::printable(m.target) + "', legacy tree '" +
                                util::printable(it.entry.target) + "'");
            // Rollback restores mtimes (ns), owners and hard links exactly, so verify holds the legacy
            // tree to all of them: a same-size edit with its mtime put back still changes ctime only,
            // which is why content is always re-hashed too.
            if (m.mtime_ns != it.entry.mtime_ns && !(moved && path.empty()))
                t.add(path, "mtime differs: manifest " + ns_time(m.mtime_ns) + ", legacy tree " + ns_time(it.entry.mtime_ns));
            if (m.uid != it.entry.uid || m.gid != it.entry.gid)
                t.add(path, "owner differs: manifest " + std::to_string(m.uid) + ":" + std::to_string(m.gid) +
                                ", legacy tree " + std::to_string(it.entry.uid) + ":" + std::to_string(it.entry.gid));
            if (m.type == EntryType::file) {
                walked_files.push_back(path);
                if (it.entry.link_to) walked_links.emplace_back(path, *it.entry.link_to);
            }
            if (m.type == EntryType::file) {
                // Unchanged since ingest hashed it (same inode, size, mtime and ctime, and not changed
                // within the racy window before the run): its content is the one ingest hashed, so the
                // manifest must hold ingest's digest and xattrs; no need to read it again.
                if (auto f = ingested.find(path);
                    f != ingested.end() && f->second.second && f->second.first->matches(it.st)) {
                    const catalog::Entry& was = *f->second.second;
                    if (!m.digest || !was.digest || *was.digest != *m.digest)
                        t.add(path, "content differs: manifest " + (m.digest ? m.digest->hex() : std::string("none")) +
                                        ", legacy tree " + (was.digest ? was.digest->hex() : std::string("none")));
                    if (was.xattrs != m.xattrs) t.add(path, "extended attributes differ from the manifest");
                    ++t.files_by_identity;
                    continue;
                }
                if (files.empty() || files.back().item.parent != it.parent) ++dirs;
                files.push_back({std::move(it), &m});
                if (files.size() == read_ahead || dirs >= max_dirs) {
                    hash_files(t, files);
                    dirs = 0;
                }
            }
        }
        hash_files(t, files);
    } catch (const walk::PackageError& e) {
        t.add(e.path(), e.what());
        return;
    }
    // Hard links, compared as groups: which path of a group a walk meets first is not the manifest's
    // choice (manifest::normalize), so both sides are reduced to each group's first path in byte order.
    {
        auto mine = manifest::link_leaders(t.manifest);
        auto theirs = manifest::link_leaders(walked_links);
        auto says = [](const std::unordered_map<std::string, std::string>& l, const std::string& p) {
            auto f = l.find(p);
            if (f == l.end()) return std::string("has it alone");
            return f->second == p ? std::string("links others to it") : "links it to '" + util::printable(f->second) + "'";
        };
        for (const auto& path : walked_files) {
            auto a = mine.find(path), b = theirs.find(path);
            bool same = (a == mine.end()) == (b == theirs.end()) && (a == mine.end() || a->second == b->second);
            if (!same) t.add(path, "hard links differ: manifest " + says(mine, path) + ", legacy tree " + says(theirs, path));
        }
    }
    if (seen != want.size()) {
        // Report what the legacy tree lacks (slow path only when something is missing).
        std::map<std::string, bool> present;
        walk::PackageWalker w(store_fd, name);
        walk::Item it;
        try {
            while (w.next(it)) present[it.entry.path] = true;
        } catch (const walk::PackageError&) {
        }
        for (const auto& e : t.manifest)
            if (!present.count(e.path)) t.add(e.path, std::string("is in the manifest but missing from the legacy tree (a ") +
                                                          type_name(e.type) + ")");
    }
}

} // namespace

FileIdentity FileIdentity::of(const struct ::stat& st) {
    auto ns = [](const timespec& t) { return static_cast<std::int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec; };
    return {st.st_dev, st.st_ino, static_cast<std::int64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim)};
}

bool FileIdentity::matches(const struct ::stat& st) const {
    const FileIdentity now = of(st);
    return S_ISREG(st.st_mode) && now.dev == dev && now.ino == ino && now.size == size && now.mtime_ns == mtime_ns &&
           now.ctime_ns == ctime_ns;
}

std::vector<std::pair<std::string, std::string>> compare_tree(int dirfd, const std::string& name,
                                                              const catalog::Package& pkg,
                                                              const std::vector<catalog::Entry>& manifest, bool moved) {
    Task t;
    t.pkg = pkg;
    t.manifest = manifest;
    const unsigned holders = 2 * util::thread_count(0);
    check_tree(t, dirfd, name, ingest::read_ahead_files(holders), ingest::dir_refs_per_holder(holders), moved);
    return std::move(t.problems);
}

std::string prove_object(const cas::ObjectStore& objects, const hash::Digest& d, std::uint64_t size) {
    try {
        cas::ObjectReader r = objects.open_content(d);
        struct stat st {};
        if (::fstat(r.fd(), &st) != 0 || !S_ISREG(st.st_mode)) return "is not a regular file";
        std::string form = r.form() == cas::Form::zstd ? " (.zst)" : "";
        std::uint64_t have = r.content_size();
        if (have != size)
            return "has " + std::to_string(have) + " bytes" + form + ", the manifest says " + std::to_string(size);
        std::uint64_t n = 0;
        auto got = cas::hash_content(r, &n);
        if (n != size) return "changed while being read";
        if (got != d) return "content does not match its name" + form + " (BLAKE3 " + got.hex() + ")";
    } catch (const cas::CorruptObject& e) {
        return std::string("is corrupt: ") + e.what();
    } catch (const util::SystemError& e) {
        if (e.code() == ENOENT) return "is missing";
        if (e.code() == ELOOP) return "is not a regular file";
        return e.what();
    }
    return {};
}

Result verify_packages(store::Store& store, const std::vector<catalog::Package>& packages, const Options& opts,
                       const ProgressSink& progress, const ProblemSink& problems) {
    auto& cat = store.catalog();
    auto& objects = store.objects();
    bool file_level;
    {
        std::unique_lock<std::mutex> lk;
        if (opts.db_mutex) lk = std::unique_lock(*opts.db_mutex);
        file_level = cat.mode() == catalog::StoreMode::file_level;
    }
    // In file-level mode the manifest is the truth for packages verified before: drift in their
    // legacy trees is reported (cleanup keeps such trees), not recorded. A package migrated after the
    // cutover is still only `migrated`: verify takes it to verified or failed like before cutover.
    const bool record = opts.record == RecordState::yes;
    Result r;
    Progress report;
    report.phase = "verify";
    report.packages_total = packages.size();
    size_t next = 0;
    std::mutex own_mutex;
    std::mutex& db_mutex = opts.db_mutex ? *opts.db_mutex : own_mutex;
    unsigned threads = util::thread_count(opts.threads);
    // migrate runs this beside its own pipeline, which holds as many files open.
    const size_t read_ahead = ingest::read_ahead_files(2 * threads);
    const size_t max_dirs = ingest::dir_refs_per_holder(2 * threads);
    SeenObjects seen;
    tbb::task_arena arena(static_cast<int>(threads));
    arena.execute([&] {
        tbb::parallel_pipeline(
            threads * 2,
            tbb::make_filter<void, std::shared_ptr<Task>>(
                tbb::filter_mode::serial_in_order,
                [&](tbb::flow_control& fc) -> std::shared_ptr<Task> {
                    if (next == packages.size() || util::stop_requested()) {
                        // A stop request: the packages in flight are finished and recorded, no other starts.
                        r.left = packages.size() - next;
                        r.interrupted = r.left > 0;
                        fc.stop();
                        return nullptr;
                    }
                    auto t = std::make_shared<Task>();
                    t->pkg = packages[next++];
                    std::lock_guard lk(db_mutex);
                    t->manifest = cat.manifest(t->pkg.id, &t->stored);
                    return t;
                }) &
                tbb::make_filter<std::shared_ptr<Task>, std::shared_ptr<Task>>(
                    tbb::filter_mode::parallel,
                    [&](std::shared_ptr<Task> t) {
                        if (!t->pkg.has_manifest) {
                            t->add("", "has no manifest (state " + std::string(catalog::to_string(t->pkg.state)) +
                                           "): run casmig migrate first");
                            return t;
                        }
                        check_objects(*t, objects, seen);
                        const KnownTree* known = nullptr;
                        if (opts.known)
                            if (auto k = opts.known->find(t->pkg.id); k != opts.known->end()) known = &k->second;
                        if (t->pkg.tree != catalog::TreeState::removed)
                            check_tree(*t, store.root_fd(), t->pkg.name, read_ahead, max_dirs, false, known);
                        return t;
                    }) &
                tbb::make_filter<std::shared_ptr<Task>, void>(
                    tbb::filter_mode::serial_in_order, [&](std::shared_ptr<Task> t) {
                        ++r.packages;
                        r.files_read += t->files_read;
                        r.files_by_identity += t->files_by_identity;
                        std::string pid = util::printable(t->pkg.name);
                        for (auto& [path, msg] : t->problems)
                            if (problems) problems({pid, util::printable(path), msg});
                        if (t->problems.empty()) ++r.ok;
                        else ++r.mismatched;
                        if (!t->missing_objects.empty()) {
                            // Make the catalog truthful, so that a later migrate rewrites the content.
                            std::lock_guard lk(db_mutex);
                            for (const auto& d : t->missing_objects) cat.delete_object(d);
                        }
                        if (record && t->pkg.has_manifest &&
                            (!file_level || t->pkg.state != PackageState::verified)) {
                            std::lock_guard lk(db_mutex);
                            const char* from = catalog::to_string(t->pkg.state);
                            if (t->problems.empty() && t->pkg.state != PackageState::verified) {
                                cat.set_state(t->pkg.id, PackageState::verified);
                                cat.journal("verify", pid, from, "verified");
                            } else if (!t->problems.empty()) {
                                Problem first{pid, util::printable(t->problems[0].first), t->problems[0].second};
                                cat.set_state(t->pkg.id, PackageState::failed, "verify: " + first.line());
                                if (t->pkg.state != PackageState::failed)
                                    cat.journal("verify", pid, from, "failed", first.line());
                            }
                        } else if (record && t->pkg.has_manifest) {
                            // Verified after cutover: the state stays (the manifest is still the truth),
                            // the failure is kept beside it until a verify passes (schema 0006).
                            std::lock_guard lk(db_mutex);
                            if (!t->problems.empty()) {
                                Problem first{pid, util::printable(t->problems[0].first), t->problems[0].second};
                                const std::string line = "verify: " + first.line();
                                if (line != t->pkg.verify_error) {
                                    cat.set_verify_failure(t->pkg.id, line);
                                    cat.journal("verify", pid, "verified", "verified", "failed after cutover: " + first.line());
                                }
                            } else if (!t->pkg.verify_error.empty()) {
                                cat.set_verify_failure(t->pkg.id, "");
                                cat.journal("verify", pid, "verified", "verified", "passed again after: " + t->pkg.verify_error);
                            }
                        }
                        ++report.packages_done;
                        report.files_done += t->manifest.size();
                        if (progress) progress(report);
                    }));
    });
    return r;
}

namespace {

/// Each package's manifest object in packages/ must hash to its name and decode, and its ref must name
/// it: rebuild-catalog depends on them. A damaged one is a problem, moved to migration/corrupt/ and
/// written again from the catalog (the authority while it belongs to the store); a wrong ref is put right.
void check_manifest_objects(store::Store& store, Result& r, const ProblemSink& problems) {
    auto& cat = store.catalog();
    auto& index = store.packages();
    bool staged = false;
    for (const auto& p : cat.packages()) {
        if (!p.has_manifest || !p.manifest_object) continue;
        const hash::Digest d = *p.manifest_object;
        const std::string pid = util::printable(p.name);
        const std::string rel = store::PackageIndex::manifest_relpath(d);
        ++r.manifests_checked;
        std::string why;
        try {
            manifest::decode(index.read_manifest(d));
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error& e) {
            why = e.what();
        }
        if (!why.empty()) {
            ++r.manifests_bad;
            std::string moved;
            try {
                moved = "; the damaged file is kept at " + index.quarantine_manifest(d);
            } catch (const util::SystemError& e) {
                if (e.code() != ENOENT) throw;
            }
            auto entries = cat.manifest(p.id);
            manifest::normalize(entries);
            std::string enc = manifest::encode(entries);
            if (manifest::digest_of(enc) != d) {
                if (problems)
                    problems({pid, rel, why + moved + "; the catalog's manifest no longer encodes to it either: run casmig verify " + pid});
                continue;
            }
            index.stage(p.name, enc, d);
            staged = true;
            if (problems) problems({pid, rel, why + moved + "; written again from the catalog"});
            continue;
        }
        std::optional<hash::Digest> ref;
        try {
            ref = index.ref(p.name);
        } catch (const util::SystemError&) {
            throw;
        } catch (const util::Error&) {
        }
        if (ref != d) {
            index.stage_ref(p.name, d);
            staged = true;
            if (problems)
                problems({pid, "packages/refs/" + pid, std::string(ref ? "named another manifest" : "was missing or damaged") +
                                                            ": put back to the catalog's", true});
        }
    }
    if (staged) index.publish();
}

} // namespace

Result verify_objects(store::Store& store, const Options& opts, const ProgressSink& progress,
                      const ProblemSink& problems) {
    auto& cat = store.catalog();
    auto& objects = store.objects();
    Result r;
    std::mutex mutex;
    std::vector<std::pair<std::string, hash::Digest>> bad; // relpath, named digest
    // Objects belong to the store's owner (the owner of objects/) and are never writable: a chmod or
    // chown through a hard link that materialize made changes the object itself.
    struct stat top {};
    if (::fstat(objects.dirfd(), &top) != 0) util::throw_errno("cannot stat", objects.dir());
    // The mode an object file must have: 0444, or for a hard-link variant "<62 hex>.m<octal>" (made by
    // materialize --link hardlink) that mode without write bits; any other variant keeps its read and
    // exec bits.
    auto object_mode = [](const std::string& rel, mode_t have) -> mode_t {
        if (rel.size() == 65 || (rel.size() == 65 + cas::k_zst_suffix.size() && rel.substr(65) == cas::k_zst_suffix))
            return 0444;
        if (rel.size() > 67 && rel.compare(65, 2, ".m") == 0) {
            std::string oct = rel.substr(67);
            if (oct.size() <= 4 && oct.find_first_not_of("01234567") == std::string::npos)
                return static_cast<mode_t>(std::stoul(oct, nullptr, 8)) & 0555;
        }
        return have & 0555;
    };
    auto owner_str = [](uid_t u, gid_t g) { return std::to_string(u) + ":" + std::to_string(g); };
    /// Puts fd's mode and owner right; "" if nothing was wrong, else the one-line report.
    auto put_right = [&](int fd, const struct stat& st, mode_t want) -> std::string {
        std::string was, set, failed;
        if (st.st_uid != top.st_uid || st.st_gid != top.st_gid) {
            was += "owner " + owner_str(st.st_uid, st.st_gid);
            // Before chmod: chown clears setuid and setgid bits.
            if (::fchown(fd, top.st_uid, top.st_gid) == 0) set += "owner " + owner_str(top.st_uid, top.st_gid);
            else failed = std::strerror(errno);
        }
        if ((st.st_mode & 07777) != want) {
            was += (was.empty() ? "" : ", ") + std::string("mode ") + octal(st.st_mode & 07777);
            if (::fchmod(fd, want) == 0) set += (set.empty() ? "" : ", ") + std::string("mode ") + octal(want);
            else failed = std::strerror(errno);
        }
        if (was.empty()) return "";
        if (!failed.empty())
            return "was " + was + " and could not be put right (" + failed + "): run casmig verify --objects as root";
        return "was " + was + "; set to " + set;
    };
    // Fan-out directories: a symlink there would put objects outside the store, a writable one would
    // let anybody swap an object.
    for (const auto& n : util::list_dir(objects.dirfd(), objects.dir())) {
        if (n.size() != 2 || !std::isxdigit(static_cast<unsigned char>(n[0])) || !std::isxdigit(static_cast<unsigned char>(n[1])))
            continue;
        struct stat st {};
        if (::fstatat(objects.dirfd(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (!S_ISDIR(st.st_mode)) {
            std::string moved = objects.quarantine(n);
            io::crash_point("verify.quarantined");
            if (io::mkdirat(objects.dirfd(), n.c_str(), 0755) != 0 && errno != EEXIST)
                util::throw_errno("cannot create directory", objects.dir() + "/" + n);
            ++r.objects_bad;
            if (problems)
                problems({"-", "objects/" + n, std::string(S_ISLNK(st.st_mode) ? "is a symlink" : "is not a directory") +
                                                    ", not a fan-out directory: moved to " + moved + " and recreated"});
            continue;
        }
        util::Fd d(::openat(objects.dirfd(), n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!d || ::fstat(d.get(), &st) != 0) continue;
        std::string fix = put_right(d.get(), st, 0755);
        if (!fix.empty() && problems) problems({"-", "objects/" + n + "/", fix});
    }
    // The zstd mode's dictionaries: a .zst object made with one cannot be read without it, so a damaged
    // one is reported (never moved: nothing could replace it but a backup).
    if (int dfd = ::open(objects.dictionaries().dir().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC); dfd >= 0) {
        util::Fd dir(dfd);
        for (const auto& n : util::list_dir(dfd, objects.dictionaries().dir())) {
            auto named = hash::Digest::from_hex(n);
            if (!named || n.size() != 64) continue;
            try {
                objects.dictionaries().load(*named);
            } catch (const util::Error& e) {
                ++r.objects_bad;
                if (problems) problems({"-", std::string(cas::k_dict_dir) + "/" + n, e.what()});
            }
        }
    }
    Progress report;
    report.phase = "verify objects";
    report.unit = "objects";
    // The objects are listed one fan-out directory at a time (memory stays one shard's names, not the
    // store's): the total shown is the catalog's count, the number checked is what was found.
    report.packages_total = static_cast<std::uint64_t>(std::max<std::int64_t>(0, cat.totals().objects));
    std::atomic<std::uint64_t> done{0}, bytes{0};
    std::uint64_t unreadable = 0; // .zst objects whose dictionary is missing: reported, left in place
    std::uint64_t checked = 0;
    unsigned threads = util::thread_count(opts.threads);
    tbb::task_arena arena(static_cast<int>(threads));
    // Shards are checked in batches of at least k_objects_batch names: one fan-out directory holds a few
    // hundred objects of very unequal sizes, too few to keep every thread busy up to the batch's end.
    constexpr size_t k_objects_batch = 8192;
    std::vector<std::string> pending;
    auto check_batch = [&](const std::vector<std::string>& files) {
        checked += files.size();
        arena.execute([&] {
            // Chunks of objects are opened and read ahead together, then hashed one by one: objects
            // are usually not in the page cache (migrate writes large ones with O_DIRECT).
            std::vector<std::pair<size_t, size_t>> chunks;
            const size_t chunk_size = ingest::read_ahead_files(threads);
            for (size_t i = 0; i < files.size(); i += chunk_size)
                chunks.emplace_back(i, std::min(files.size(), i + chunk_size));
            tbb::parallel_for_each(chunks.begin(), chunks.end(), [&](std::pair<size_t, size_t> chunk) {
                std::vector<util::Fd> fds(chunk.second - chunk.first);
                auto open_object = [&](const std::string& rel) {
                    return util::Fd(::openat(objects.dirfd(), rel.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
                };
                for (size_t i = chunk.first; i < chunk.second; ++i) {
                    int fd = (fds[i - chunk.first] = open_object(files[i])).get();
                    if (fd < 0) continue; // opened again below, which reports the error
                    struct stat st {};
                    if (::fstat(fd, &st) == 0) ingest::prefetch(fd, static_cast<std::uint64_t>(st.st_size));
                }
                for (size_t i = chunk.first; i < chunk.second; ++i) {
                    const std::string& rel = files[i];
                    std::string hex = rel.substr(0, 2) + rel.substr(3, 62);
                    auto named = hash::Digest::from_hex(hex);
                    bool ok = false, keep = false;
                    std::string why, fix;
                    if (!named || rel.size() < 65) {
                        why = "is not named by a BLAKE3 digest";
                    } else {
                        util::Fd owned = std::move(fds[i - chunk.first]);
                        if (!owned) owned = open_object(rel);
                        const int fd = owned.get();
                        struct stat st {};
                        if (fd < 0) {
                            why = errno == ELOOP ? std::string("is a symlink, not an object")
                                                 : std::string("cannot be opened: ") + std::strerror(errno);
                        } else if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
                            why = "is not a regular file";
                        } else {
                            std::uint64_t n = 0;
                            const bool zst = rel.size() == 65 + cas::k_zst_suffix.size() && rel.substr(65) == cas::k_zst_suffix;
                            try {
                                // The one read path: a .zst variant is hashed over its uncompressed bytes.
                                cas::ObjectReader rd(util::Fd(::dup(fd)), zst ? cas::Form::zstd : cas::Form::raw,
                                                     objects.dir() + "/" + rel, &objects.dictionaries());
                                auto d = cas::hash_content(rd, &n);
                                ok = d == *named;
                                if (!ok) why = "content does not match its name (BLAKE3 " + d.hex() + ")";
                            } catch (const cas::MissingDictionary& e) {
                                // Not the object's fault: it stays where it is (the dictionary is reported above).
                                why = e.what();
                                keep = true;
                            } catch (const cas::CorruptObject& e) {
                                why = std::string("is corrupt: ") + e.what();
                            } catch (const util::SystemError& e) {
                                why = e.what();
                            }
                            bytes += n;
                            if (ok) fix = put_right(fd, st, object_mode(rel, st.st_mode));
                        }
                    }
                    std::uint64_t k = ++done;
                    std::lock_guard lk(mutex);
                    if (!ok && keep) ++unreadable;
                    if (!ok && !keep) bad.emplace_back(rel, named.value_or(hash::Digest{}));
                    if (!ok && problems) problems({"-", "objects/" + rel, why});
                    if (!fix.empty() && problems) problems({"-", "objects/" + rel, fix});
                    report.packages_done = k;
                    report.bytes_done = bytes;
                    report.packages_total = std::max(report.packages_total, k);
                    if (progress && k % 256 == 0) progress(report);
                }
            });
        });
    };
    objects.for_each_shard([&](const std::vector<std::string>& names) {
        if (util::stop_requested()) {
            r.interrupted = true; // what was found bad so far is still quarantined below
            return;
        }
        pending.insert(pending.end(), names.begin(), names.end());
        if (pending.size() < k_objects_batch) return;
        check_batch(pending);
        pending.clear();
    });
    if (!pending.empty() && !r.interrupted) check_batch(pending);
    if (progress) progress(report);
    r.objects_checked = checked;
    r.objects_bad += bad.size() + unreadable;
    // Quarantine corrupt objects so a later migrate rewrites them, and name who needs them.
    if (!bad.empty()) {
        catalog::Transaction tx(cat.db());
        for (auto& [rel, d] : bad) {
            // Never deleted, never over an earlier quarantined file of the same name.
            std::string moved;
            try {
                moved = objects.quarantine(rel);
            } catch (const util::SystemError& e) {
                if (e.code() != ENOENT) throw;
                moved = "nowhere (it vanished meanwhile)";
            }
            io::crash_point("verify.quarantined");
            // The catalog must not claim it any more (unless its other form is still there): a later
            // migrate then rewrites the content.
            const bool content_form =
                rel.size() == 65 || (rel.size() == 65 + cas::k_zst_suffix.size() && rel.compare(65, std::string::npos, cas::k_zst_suffix) == 0);
            if (content_form && !objects.on_disk(d)) cat.delete_object(d);
            std::string names;
            bool recoverable = false;
            // After cutover a verified package's manifest stays the truth: it keeps its state and the
            // failure is recorded beside it (schema 0006) until a verify passes; before, it fails (and
            // migrate --retry-failed rewrites the content from its legacy tree).
            const bool file_level = cat.mode() == catalog::StoreMode::file_level;
            std::vector<std::pair<std::int64_t, bool>> ids; // id, keeps its state
            for (const auto& p : cat.packages_needing(d)) {
                names += (names.empty() ? "" : ", ") + util::printable(p.name);
                if (p.tree != catalog::TreeState::removed) recoverable = true;
                ids.emplace_back(p.id, file_level && p.state == PackageState::verified);
            }
            const std::string why = "verify --objects: object " + d.hex() + " was corrupt (moved to " + moved + ")";
            for (auto [id, keeps] : ids) {
                if (keeps) cat.set_verify_failure(id, why);
                else cat.set_state(id, PackageState::failed, why);
            }
            cat.journal("verify", names, "", "failed", "corrupt object " + rel + " moved to " + moved);
            if (problems)
                problems({"-", "objects/" + rel,
                          "moved to " + moved + "; needed by " + (names.empty() ? std::string("no package") : names) +
                              (names.empty() ? ""
                               : file_level ? "; restore it from a backup or reinstall those packages (casmig remove, casmig add), "
                                              "then casmig verify (runbook: A package fails verify after cutover)"
                               : recoverable ? "; run casmig migrate --retry-failed to rewrite it from a legacy tree"
                                             : "; no legacy tree holds it any more: restore it from a backup")});
        }
        tx.commit();
    }
    if (r.interrupted) return r; // the whole-store checks below are for a complete run
    // Catalogued objects that are missing on disk.
    cat.for_each_object([&](const catalog::ObjectRow& o) {
        if (!objects.on_disk(o.digest)) {
            bool quarantined = false;
            for (auto& b : bad)
                if (b.second == o.digest) quarantined = true;
            if (quarantined) return;
            ++r.objects_bad;
            if (problems) problems({"-", "objects/" + cas::object_relpath(o.digest), "is in the catalog but missing on disk"});
        }
    });
    check_manifest_objects(store, r, problems);
    return r;
}

} // namespace casmig::verify
