// casmig::migrate — the migration pipeline (oneTBB parallel_pipeline) and the plan dry run.
//
//   walk (serial, in order)  : picks the next pending package, marks it in_progress, walks its tree
//                              (walk::PackageWalker) and cuts it into units of at most k_unit_files
//                              files / k_unit_bytes bytes;
//   ingest (parallel)        : opens, hashes and stages each file of a unit (ingest_file);
//   commit (serial, in order): gathers each package's manifest; every k_batch_* it publishes the staged
//                              objects (cas::ObjectStore::publish: durable first) and then commits the
//                              finished packages' rows in one transaction, as `migrated` or `failed`.
// Then, unless verify is off, every `migrated` package is verified (verify::verify_packages).
//
// Space: before it writes anything, migrate checks that the selection fits on the store's filesystem
// (space_needed(): a stat-only upper bound first, plan's exact count only when the bound does not fit)
// and refuses (util::RefusedError) when it does not, unless SpaceCheck::no. When the disk fills up
// anyway (ENOSPC, EDQUOT, SQLITE_FULL: another writer, a quota, or SpaceCheck::no), the run starts no
// more packages, deletes its staged files that no finished package needs, publishes and commits the
// finished packages (that progress is durable), then tries each unfinished package alone, only if it
// fits; what does not fit stays pending (Result::not_started) and temp/ is left empty.
//
// Stop requests (casmig/util/interrupt.hpp): the walk stage starts no package once one is made, as
// with the time budget; what is in flight is published, committed and verified as usual (verify
// itself stops between packages), and Result::interrupted says what is left.
//
// Locking: migrate() requires the caller to hold the store lock; plan() takes none and writes nothing.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::migrate {

enum class Verify { no, yes };
enum class RetryFailed { no, yes };
enum class SpaceCheck { no, yes };
enum class Dictionary { no, yes };

struct Options {
    std::vector<std::string> packages;            // named packages only (empty: all pending)
    std::optional<std::uint64_t> limit;           // at most this many packages
    std::optional<std::chrono::milliseconds> time_budget; // start no package after this
    std::uint64_t io_limit = 0;                   // bytes/s read from legacy trees, 0 = unlimited
    RetryFailed retry_failed = RetryFailed::no;
    Verify verify = Verify::yes;
    SpaceCheck space_check = SpaceCheck::yes;     // migrate only: refuse a selection that cannot fit
    unsigned threads = 0;                         // 0: all cores
    std::optional<int> compress;                  // --compress[=LEVEL]: zstd store mode (see compression.hpp)
    Dictionary dictionary = Dictionary::yes;      // --no-dictionary: a new zstd store trains none
};

struct Result {
    std::uint64_t packages = 0, migrated = 0, verified = 0, failed = 0;
    std::uint64_t files = 0, bytes = 0;           // read from legacy trees
    std::uint64_t new_objects = 0, new_object_bytes = 0;
    bool stopped_by_budget = false;
    bool disk_full = false;                       // the disk filled up during the run
    std::string disk_full_error;                  // the first such error (one line, names the path)
    std::uint64_t not_started = 0;                // selected packages left pending because they did not fit
    bool unverified = false;                      // the disk filled up before verify could record its result
    // A stop was requested (util::request_stop: SIGINT/SIGTERM in the CLI) and work is left: no package
    // was started after it, the packages in flight were committed (and verified, unless the verify
    // stopped too). Of the selection, `left` are still to migrate and `left_unverified` migrated but
    // not verified yet; a rerun continues with both.
    bool interrupted = false;
    std::uint64_t left = 0, left_unverified = 0;
    /// Failed packages this run did not select (no --retry-failed, no package named): still failed.
    std::uint64_t failed_not_retried = 0;
    /// The verify pass: legacy files read and hashed again, and files proven unchanged since ingest
    /// hashed them by their identity (inode, size, mtime, ctime; verify::Options::known).
    std::uint64_t verify_files_read = 0, verify_files_by_identity = 0;
    double seconds = 0;
};

/// The detail of the journal row that ends a migrate run that did something: this prefix, the result
/// ("completed", "interrupted (SIGTERM)", "disk full", "time budget reached"), "; started_ns N".
inline constexpr const char* k_run_ended = "run ended: ";

/// Migrates (and verifies) packages. Problems (failed packages, verify mismatches) go to `problems`.
/// Throws util::UsageError for a named package that is not in the store, util::RefusedError when the
/// selection does not fit (opts.space_check, see above; the catalog is then unchanged).
Result migrate(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems);

struct PlanResult {
    std::uint64_t packages = 0, files = 0, bytes = 0, unique_bytes = 0, unique_objects = 0;
    std::uint64_t free_bytes = 0, needed_bytes = 0;
    std::uint64_t failed = 0; // packages that would fail (special files, unreadable)
    std::uint64_t packages_that_fit = 0; // how many of the selection, in order, fit in free_bytes
};

/// What migrate with these options would need on the store's filesystem: the bytes of new objects
/// (each rounded up by half a block) plus about 200 bytes of catalog per file (plan's formula).
struct SpaceNeed {
    std::uint64_t packages = 0, needed_bytes = 0, free_bytes = 0;
    std::uint64_t packages_that_fit = 0; // how many of the selection, in order, fit
    bool exact = false;                  // false: the stat-only upper bound already fits
};
/// Cheap first: a stat-only walk of the selected packages gives an upper bound (every file new). Only
/// if that does not fit are the packages hashed, as plan does, to count distinct content not yet under
/// objects/ (reads every selected file once). Writes nothing (opens an existing catalog read-write, as
/// migrate does); call with the store lock held.
SpaceNeed space_needed(store::Store& store, const Options& opts, const ProgressSink& progress);

/// Hashes what migrate would read and reports it; writes nothing, takes no lock.
PlanResult plan(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems);

} // namespace casmig::migrate
