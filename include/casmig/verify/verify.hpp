// casmig::verify — compares migrated packages with their legacy trees, and objects with their names.
//
// Locking: both functions require the store lock (they record package states and quarantine corrupt
// objects into migration/corrupt/).
#pragma once
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::verify {

enum class RecordState { no, yes };

struct Options {
    unsigned threads = 0;
    RecordState record = RecordState::yes; // set verified / failed from the outcome
    std::mutex* db_mutex = nullptr;         // held around every catalog use, when the caller shares it
};

struct Result {
    std::uint64_t packages = 0, ok = 0, mismatched = 0;
    std::uint64_t objects_checked = 0, objects_bad = 0;
    std::uint64_t manifests_checked = 0, manifests_bad = 0; // packages/manifests (verify --objects)
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
