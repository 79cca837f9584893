// casmig::lifecycle — the admin lifecycle after migration: cutover, cleanup, rollback, remove, gc,
// and materialize (rebuilding a package tree from the CAS).
//
// Locking: every function but materialize requires the store lock (migration/lock). materialize
// takes migration/gc.lock shared and gc/remove take it exclusive, so objects never vanish under a
// reader.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "casmig/catalog/catalog.hpp"
#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::lifecycle {

enum class DryRun { no, yes };
enum class SpaceCheck { no, yes };

struct RecoverResult {
    std::uint64_t restored = 0, deleted = 0, kept = 0;
};
/// Finishes or undoes what a stopped cleanup, remove or rollback left in temp/ (call with the store
/// lock held, before anything else): a legacy tree moved aside but not recorded removed goes back under
/// its name; one recorded removed is proven again (tree and objects) and deleted, or put back when the
/// proof fails; a half-built rollback tree is deleted (it is rebuilt from the CAS). Never overwrites
/// anything at a package's name: such a tree stays in temp/ and is reported.
RecoverResult recover(store::Store& store, const ProblemSink& problems);

struct SyncResult {
    std::uint64_t manifests_written = 0, refs_dropped = 0, refs_restored = 0;
    bool mode_written = false;
};
/// Brings packages/ up to the catalog (call with the lock held, after recover()): writes the manifest
/// object and ref of every package whose manifest the catalog holds without one (catalogs from before
/// schema 0003), and mirrors the store mode into packages/store.
SyncResult sync_packages(store::Store& store);

/// What every command that changes the store does first, the CLI and the C library alike: the store
/// lock (Store::lock: the catalog checked against the store for `purpose`), then recover(), then
/// sync_packages() — whose failure is only a warning (`warn`, one line without prefix): packages/
/// mirrors the catalog and the next command tries again. Throws what Store::lock throws.
std::unique_ptr<store::StoreLock> lock_store(store::Store& store, const std::string& command, store::Purpose purpose,
                                             const ProblemSink& problems, const std::function<void(const std::string&)>& warn);

/// What `status` shows, read without the store lock (a read-only catalog connection: it never blocks a
/// running command and writes nothing). Shared by the CLI and the C library.
/// The newest run of one command, from the journal (the rows one process wrote).
struct LastRun {
    bool found = false;
    std::string who;                        // user@host pid N
    std::int64_t started_ns = 0, ended_ns = 0; // the run's start (its end row says) and last journal row
    std::uint64_t migrated = 0, failed = 0, files = 0, bytes = 0;
    /// From the run's end row (migrate::k_run_ended): "completed", "interrupted (SIGTERM)", …; "" when
    /// the run wrote none (killed, crashed, or still running).
    std::string result;
};
struct StatusReport {
    LastRun last_migrate;
    std::string lock_holder;           // "" when the store lock is free ("casmig migrate pid N" otherwise)
    double eta_seconds = -1;           // pending packages at the last run's pace; -1: unknown
    std::string mode = "legacy";       // catalog::to_string(StoreMode)
    std::string compression = "none";  // cas::Compression::setting(), or "none"
    std::uint64_t total = 0;           // packages, counting legacy directories not cataloged yet
    std::map<std::string, std::uint64_t> states; // every PackageState name, 0 when none
    std::map<std::string, std::uint64_t> trees;  // every TreeState name
    catalog::Totals totals;
    std::vector<std::pair<std::string, std::string>> failures; // printable package id, its error
    /// Verified packages whose last verify after cutover failed (catalog::Package::verify_error).
    struct VerifyFailure {
        std::string package, error;
        std::int64_t at_ns = 0;
    };
    std::vector<VerifyFailure> verify_failures;
    std::vector<catalog::Catalog::JournalRow> journal;         // newest first
};
/// The store's status with the newest journal_lines journal rows. Throws what Store::check_catalog
/// (Purpose::read) throws for a catalog that does not fit the store.
StatusReport status(store::Store& store, int journal_lines);

/// True for a package row that status and list leave out: pending, failed or rolled back, without a
/// manifest, its tree recorded present but its directory gone (`on_disk` false). The next locked
/// command drops it from the catalog (Store::discover); until then it is nobody's business.
bool vanished_unmigrated(const catalog::Package& p, bool on_disk);

/// One package as `casmig list` shows it.
struct PackageListing {
    std::string name;                  // the package id (bytes, not necessarily UTF-8)
    catalog::PackageState state = catalog::PackageState::pending;
    catalog::TreeState tree = catalog::TreeState::present;
    std::optional<std::uint64_t> files, bytes; // from its manifest; nullopt while it has none
    std::string error;                 // the reason of a failed package, else ""
    std::string verify_error;          // a verified package's failed verify after cutover, else ""
};
/// Every package of the store, sorted by id bytes: the catalog's (as status counts them) and the legacy
/// directories it does not know yet (pending, tree present). Read without the store lock (a read-only
/// catalog connection, like status; a store without a catalog lists its legacy directories). Throws what
/// Store::check_catalog (Purpose::read) throws.
std::vector<PackageListing> list_packages(store::Store& store);

/// Where package_entries() read a package from.
enum class EntrySource { manifest, legacy_tree };
/// Calls `f` for each entry of package `name` as a reader sees it in dual mode (docs/api.md): from its
/// manifest once the package is verified (in path-byte order, digests set), else from a walk of its
/// legacy tree (preorder, each directory's names in byte order, no digests). Stops early when `f`
/// returns false. Takes no lock: the catalog is read through a read-only connection and the tree is
/// only read, never followed through a symlink. Throws util::UsageError for an id that is neither a
/// verified package nor a legacy directory of the store (reserved names such as objects/ included),
/// util::Error naming the package and path when the walk meets something it cannot read (a fifo, a
/// tree changing under it), and what Store::check_catalog (Purpose::read) throws.
EntrySource package_entries(store::Store& store, const std::string& name,
                            const std::function<bool(const manifest::Entry&)>& f);

enum class LinkMode { copy, reflink, hardlink };

struct CutoverResult {
    std::uint64_t packages = 0, marked = 0;
};
/// Refuses (util::RefusedError, store unchanged) unless every legacy package is verified and every
/// legacy directory is known; re-verifies every package; sets mode file-level; marks every tree.
CutoverResult cutover(store::Store& store, unsigned threads, const ProgressSink& progress, const ProblemSink& problems);

struct CleanupResult {
    std::uint64_t trees = 0, skipped = 0;
    std::uint64_t bytes = 0;     // apparent: st_size of every legacy file deleted (JSON freed_bytes)
    std::uint64_t allocated = 0; // on disk: st_blocks × 512 of each file whose last name was deleted
                                 // (a sparse file counts its data, a file hard-linked from elsewhere
                                 // nothing); JSON freed_allocated_bytes
    // A stop was requested (util::request_stop): `left` marked trees were not started (they stay
    // marked, untouched); those in flight were finished — proven, recorded and deleted, or put back.
    bool interrupted = false;
    std::uint64_t left = 0;
};
/// Deletes each marked legacy tree (and each tree verified after cutover) only after proving, in this
/// run, that it equals its manifest (path set, types, modes, owners, mtimes, symlink targets, hard
/// links, xattrs, content) and that every object it needs hashes to its name. Order: intent journalled;
/// tree renamed into temp/ (out of readers' way, so the proven tree is the deleted one); proven (a
/// corrupt object is rewritten from the proven legacy file, the bad copy quarantined); recorded
/// removed; deleted. A tree that differs goes back under its name and is reported (skipped). Refuses
/// before cutover, and as non-root when a manifest holds what only root can restore. A stop request
/// starts no further tree (CleanupResult::interrupted); a rerun continues.
CleanupResult cleanup(store::Store& store, DryRun dry, unsigned threads, const ProgressSink& progress,
                      const ProblemSink& problems);

struct RollbackResult {
    std::uint64_t packages = 0, rebuilt = 0, files = 0, bytes = 0, failed = 0;
    std::uint64_t linked_across = 0; // rebuilt files made hard links of another package's file again
    // A stop was requested (util::request_stop): `left` trees to rebuild were not started; the trees
    // already built were put in place and recorded, the mode stays until a rerun brings back the rest.
    bool interrupted = false;
    std::uint64_t left = 0;
};
/// Back to mode legacy: every package with a manifest whose legacy tree is not exactly present (absent,
/// not a directory, or — after cleanup or cutover — different from its manifest) is rebuilt from the CAS
/// (staged in temp/, synced, renamed into place); whatever was at its name is moved to
/// migration/aside/, never deleted. Hard links across packages come back once the files are proven
/// equal (detail::link_across()). Package by package: one that cannot be rebuilt is reported and
/// counted in `failed`, the others carry on, and the mode stays until every package is back.
/// Refuses (store unchanged) when free space is short (unless SpaceCheck::no) and, as non-root, when
/// a tree to rebuild has foreign owners or capabilities. Idempotent. A stop request starts no further
/// rebuild (RollbackResult::interrupted); a rerun continues.
RollbackResult rollback(store::Store& store, unsigned threads, SpaceCheck space, const ProgressSink& progress,
                        const ProblemSink& problems);

struct MaterializeResult {
    std::uint64_t files = 0, dirs = 0, symlinks = 0, bytes = 0;
    std::uint64_t linked = 0, reflinked = 0, copied = 0;
    std::uint64_t decompressed = 0; // copies made from a .zst object (hardlink and reflink cannot use one)
};
/// Rebuilds package `name` at `dest` (absent or an empty directory) from its manifest.
MaterializeResult materialize(store::Store& store, const std::string& name, const std::string& dest, LinkMode link);

/// One command's outcome, for write_metrics().
struct RunInfo {
    std::string command;
    int exit_code = 0;
    double seconds = 0;
    std::uint64_t failures = 0; // problems reported (failed packages, mismatches)
};
/// Writes the store's counts (when its catalog can be read) and the run's outcome to `path` in the
/// Prometheus text format, replacing it atomically (node_exporter textfile collector). The last
/// success time of other commands is carried over from the file being replaced. Throws util::Error.
void write_metrics(store::Store& store, const std::string& path, const RunInfo& run);

enum class Severity { warning, critical };
const char* to_string(Severity s);
struct Finding {
    Severity severity;
    std::string check;   // catalog, failures, speed, integrity, space, temp, lock
    std::string message; // one line: what, where, what to do
};
struct DoctorOptions {
    double max_failure_percent = 5;  // the strategy's rollback trigger
    double stall_hours = 48;         // pending work but no migrate progress (or a lock held) this long
    /// The last migrate run, if it ran at least min_run_seconds and work is still pending, migrated at
    /// least this many packages per hour (npm-sized packages go at thousands per hour on 2 cores).
    double min_packages_per_hour = 60;
    double min_run_seconds = 300;
};
struct DoctorReport {
    bool healthy = true;
    std::string mode = "legacy";
    std::vector<Finding> findings;
    std::string lock_holder;          // "" when the store lock is free
    std::uint64_t free_bytes = 0, pending_bytes = 0; // pending: allocated bytes of trees still to migrate
};
/// Who holds the store lock ("" when nobody does), from /proc/locks and the lock file's text: never
/// probes the lock (a probe could make another command's non-blocking lock attempt fail).
std::string lock_holder(store::Store& store);

/// The store's health, read-only, no lock taken (issue 10): the catalog fits its store and passes
/// quick_check; failure rate; migration progress; quarantined objects; space for the pending work;
/// temp/ leftovers; how long the lock has been held. Never throws for what it finds.
DoctorReport doctor(store::Store& store, const DoctorOptions& opts);

struct AddResult {
    std::uint64_t files = 0, bytes = 0;
    std::uint64_t new_objects = 0, new_object_bytes = 0; // contents the store did not hold yet
    bool failed = false; // nothing recorded; each reason went to `problems`
    bool interrupted = false; // a stop request came before the package was published: nothing recorded
    double seconds = 0;
};
/// Adds package `name` straight in file-level form from the directory `source` (the package manager's
/// install path after cutover, usable in any mode; a legacy store becomes dual): its files' contents
/// become objects, its manifest goes into packages/ and the catalog, the staging directory is compared
/// with the manifest again (every file re-hashed), and the package is recorded `verified` with its
/// legacy tree `removed`: readers use its manifest, rollback builds its tree. `source` is only read
/// (never followed below its root, never changed); the caller removes it afterwards. Special files, an
/// unreadable entry or a file changing while it is read: each is reported through `problems`,
/// nothing is recorded and the result says failed. Throws util::UsageError (not a package id, or the
/// staging directory cannot be opened), util::RefusedError (the id is in the catalog, or something is
/// at <store>/<name>; store unchanged), util::SystemError (I/O). Caller holds the store lock.
AddResult add_package(store::Store& store, const std::string& name, const std::string& source, unsigned threads,
                      const ProblemSink& problems);

/// Drops a package: its legacy tree (if present), its catalog rows and its ref in packages/. Objects
/// and manifest objects stay for gc. Returns a warning when only the ref could not be removed.
std::optional<std::string> remove_package(store::Store& store, const std::string& name);

struct RebuildResult {
    std::uint64_t packages = 0, recovered = 0, pending = 0, failed = 0, lost = 0, objects = 0;
    std::uint64_t objects_quarantined = 0, trees_moved_back = 0, orphan_manifests = 0;
    std::string mode, reason, old_catalog; // reason: why the old catalog did not fit; old_catalog: where it went
    std::string compression;               // the zstd mode restored from packages/store ("" for a raw store)
    bool mode_inferred = false;            // packages/store did not say
};
/// Recreates store.db from the store alone (src/lifecycle/rebuild.cpp, docs/format.md): packages/refs
/// and their manifest objects (each must hash to its name and decode), objects/ (each one a manifest
/// needs is re-hashed; a wrong one is quarantined), legacy trees (a present tree is compared with its
/// manifest). Refuses (store unchanged) when the catalog fits its store, unless `force`. The old catalog
/// is moved aside to <db>.replaced-<UTC time>, never deleted; trees an interrupted cleanup left in
/// temp/ go back under their names (or to migration/aside/). Call with the lock taken for
/// Purpose::rebuild. Each package whose content cannot be recovered is reported (not a warning).
RebuildResult rebuild_catalog(store::Store& store, bool force, unsigned threads, const ProgressSink& progress,
                              const ProblemSink& problems);

struct GcResult {
    std::uint64_t removed_objects = 0, freed_bytes = 0;
    std::uint64_t removed_manifests = 0, removed_refs = 0; // packages/ entries no catalogued package names
    std::uint64_t fixed_refs = 0;                          // refs put back to the catalog's manifest
};
/// Deletes objects no package references (catalog rows and files, variants included), then refs in
/// packages/refs/ of packages the catalog does not hold and manifest objects no package names.
GcResult gc(store::Store& store, DryRun dry);

} // namespace casmig::lifecycle
