// casmig::verify — compares migrated packages with their legacy trees, and objects with their names.
//
// Locking: both functions require the store lock (they record package states and quarantine corrupt
// objects into migration/corrupt/).
#pragma once
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <sys/stat.h>
#include <unordered_map>
#include <vector>

#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::verify {

enum class RecordState { no, yes };

/// What migrate's ingest saw of a legacy file it hashed: the inode's identity at the end of that read
/// (device, inode, size, mtime, ctime; ingest proved them unchanged from before the read to after it).
struct FileIdentity {
    dev_t dev = 0;
    ino_t ino = 0;
    std::int64_t size = 0, mtime_ns = 0, ctime_ns = 0;
    static FileIdentity of(const struct ::stat& st);
    /// st is a regular file with this identity.
    bool matches(const struct ::stat& st) const;
};

/// One package as migrate's ingest found it moments ago: its entries as hashed (digest, extended
/// attributes; sorted or not) and, by path, the identity of each regular file that is safe to prove by
/// identity — ingest records only files whose ctime is older than the run's start minus
/// k_racy_window_ns by the store filesystem's clock, on the store's own device, on a local filesystem.
struct KnownTree {
    const std::vector<catalog::Entry>* entries = nullptr;
    const std::vector<std::pair<std::string, FileIdentity>>* files = nullptr;
};
using KnownTrees = std::unordered_map<std::int64_t, KnownTree>; // by package id

/// A file changed this long (or less) before the run began is re-read by migrate's verify even if
/// its identity matches: a write in the same tick of the filesystem's clock as the one before it
/// leaves ctime unchanged (git's "racily clean" entries), and writes through a shared writable
/// mapping stamp ctime only at the first write fault after the page was written back (about 30 s
/// with the kernel's default dirty_expire_centisecs). 60 s covers both with room.
inline constexpr std::int64_t k_racy_window_ns = 60'000'000'000;

struct Options {
    unsigned threads = 0;
    RecordState record = RecordState::yes; // set verified / failed from the outcome
    std::mutex* db_mutex = nullptr;         // held around every catalog use, when the caller shares it
    /// migrate only: a legacy file whose lstat now matches its FileIdentity in `known` has the content
    /// ingest hashed (any write, truncate, chmod, xattr change or replacement moves ctime or the
    /// inode), so its digest and xattrs are compared from there instead of reading it again. Every
    /// other check (path set, types, modes, owners, mtimes, links, objects) is unchanged. Standalone
    /// verify, cutover, cleanup and rollback pass none: they re-read every file.
    const KnownTrees* known = nullptr;
};

struct Result {
    std::uint64_t packages = 0, ok = 0, mismatched = 0;
    std::uint64_t objects_checked = 0, objects_bad = 0;
    std::uint64_t manifests_checked = 0, manifests_bad = 0; // packages/manifests (verify --objects)
    // Legacy files whose content was re-read and hashed, and files proven by identity (Options::known).
    std::uint64_t files_read = 0, files_by_identity = 0;
    // A stop was requested (util::request_stop) before every package or object was checked: `left`
    // packages were not started (what was checked is recorded), or verify_objects checked only part
    // of objects/ (a rerun checks everything again).
    bool interrupted = false;
    std::uint64_t left = 0;
};

/// Checks each package against its manifest: with its legacy tree present, the path set, types,
/// modes, symlink targets and content digests (legacy files re-hashed), and that every object the
/// manifest needs exists with the right size; with the tree removed, only the objects. Each problem
/// goes to `problems` (at most 20 per package). With RecordState::yes a clean package becomes
/// `verified` and a mismatching one `failed` (not in file-level mode, where the manifest is the truth).
Result verify_packages(store::Store& store, const std::vector<catalog::Package>& packages, const Options& opts,
                       const ProgressSink& progress, const ProblemSink& problems);

/// The differences between the tree at dirfd/name and `manifest` as (path, message), at most 21; empty
/// when the tree is exact: path set, types, modes, owners, mtimes (ns), symlink targets, hard links,
/// extended attributes and content (every file re-hashed). `moved`: the tree was renamed aside, so its
/// root's mtime is not compared. Used by cleanup (prove before delete) and rollback (trust nothing at a
/// package's name).
std::vector<std::pair<std::string, std::string>> compare_tree(int dirfd, const std::string& name,
                                                              const catalog::Package& pkg,
                                                              const std::vector<catalog::Entry>& manifest,
                                                              bool moved = false);

/// Re-hashes one object: "" if objects/<d> is a regular file of `size` bytes whose BLAKE3 is d,
/// otherwise what is wrong with it ("is missing", "content does not match its name …").
std::string prove_object(const cas::ObjectStore& objects, const hash::Digest& d, std::uint64_t size);

/// fsck: re-hashes every file under objects/ against its name and checks every catalogued object is
/// present. A corrupt object (or a symlink or anything but a regular file at an object's name) is moved
/// to migration/corrupt/ (so that a later migrate rewrites it from a legacy tree) and the packages that
/// need it are named. Objects are also put right and reported, one line each: mode 0444 (a ".m<octal>"
/// hard-link variant: that mode without write bits), owner and group those of objects/; fan-out
/// directories: real directories, mode 0755, same owner. Each fix counts as a problem (the command
/// exits 1; a second run finds nothing). Caller holds the store lock.
Result verify_objects(store::Store& store, const Options& opts, const ProgressSink& progress,
                      const ProblemSink& problems);

} // namespace casmig::verify
