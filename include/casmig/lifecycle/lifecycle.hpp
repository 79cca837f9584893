// casmig::lifecycle — the admin lifecycle after migration: cutover, cleanup, rollback, remove, gc,
// and materialize (rebuilding a package tree from the CAS).
//
// Locking: every function but materialize requires the store lock (migration/lock). materialize
// takes migration/gc.lock shared and gc/remove take it exclusive, so objects never vanish under a
// reader.
#pragma once
#include <cstdint>
#include <string>

#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::lifecycle {

enum class DryRun { no, yes };
enum class LinkMode { copy, reflink, hardlink };

struct CutoverResult {
    std::uint64_t packages = 0, marked = 0;
};
/// Refuses (util::RefusedError, store unchanged) unless every legacy package is verified and every
/// legacy directory is known; re-verifies every package; sets mode file-level; marks every tree.
CutoverResult cutover(store::Store& store, unsigned threads, const ProgressSink& progress, const ProblemSink& problems);

struct CleanupResult {
    std::uint64_t trees = 0, bytes = 0, skipped = 0;
};
/// Deletes marked legacy trees whose manifest and objects are all present (crash-safe: each tree is
/// renamed into temp/ first, recorded removed, then deleted). Refuses before cutover.
CleanupResult cleanup(store::Store& store, DryRun dry, const ProgressSink& progress, const ProblemSink& problems);

struct RollbackResult {
    std::uint64_t packages = 0, rebuilt = 0, files = 0, bytes = 0;
};
/// Back to mode legacy: rebuilds every removed tree exactly from the CAS (staged in temp/, renamed into
/// place), unmarks marked trees, sets migrated packages rolled_back. Idempotent.
RollbackResult rollback(store::Store& store, const ProgressSink& progress, const ProblemSink& problems);

struct MaterializeResult {
    std::uint64_t files = 0, dirs = 0, symlinks = 0, bytes = 0;
    std::uint64_t linked = 0, reflinked = 0, copied = 0;
};
/// Rebuilds package `name` at `dest` (absent or an empty directory) from its manifest.
MaterializeResult materialize(store::Store& store, const std::string& name, const std::string& dest, LinkMode link);

/// Drops a package: its legacy tree (if present) and its catalog rows. Objects stay for gc.
void remove_package(store::Store& store, const std::string& name);

struct GcResult {
    std::uint64_t removed_objects = 0, freed_bytes = 0;
};
/// Deletes objects no package references (catalog rows and files, variants included).
GcResult gc(store::Store& store, DryRun dry);

} // namespace casmig::lifecycle
