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

struct Options {
    std::vector<std::string> packages;            // named packages only (empty: all pending)
    std::optional<std::uint64_t> limit;           // at most this many packages
    std::optional<std::chrono::milliseconds> time_budget; // start no package after this
    std::uint64_t io_limit = 0;                   // bytes/s read from legacy trees, 0 = unlimited
    RetryFailed retry_failed = RetryFailed::no;
    Verify verify = Verify::yes;
    unsigned threads = 0;                         // 0: all cores
};

struct Result {
    std::uint64_t packages = 0, migrated = 0, verified = 0, failed = 0;
    std::uint64_t files = 0, bytes = 0;           // read from legacy trees
    std::uint64_t new_objects = 0, new_object_bytes = 0;
    bool stopped_by_budget = false;
    double seconds = 0;
};

/// Migrates (and verifies) packages. Problems (failed packages, verify mismatches) go to `problems`.
/// Throws util::UsageError for a named package that is not in the store.
Result migrate(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems);

struct PlanResult {
    std::uint64_t packages = 0, files = 0, bytes = 0, unique_bytes = 0, unique_objects = 0;
    std::uint64_t free_bytes = 0, needed_bytes = 0;
    std::uint64_t failed = 0; // packages that would fail (special files, unreadable)
};

/// Hashes what migrate would read and reports it; writes nothing, takes no lock.
PlanResult plan(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems);

} // namespace casmig::migrate
