// casmig::store — the store's layout on disk, its lock, and discovery of legacy package trees.
//
//   <store>/<package-id>/   legacy trees: directories not starting with '.' and not reserved
//   <store>/objects/        the CAS (see cas/object_store.hpp)
//   <store>/temp/           staging for atomic writes (cas/object_store.hpp, "temp/"): each writing
//                           process's own locked casmig-<pid>-<rand>/, the lifecycle's trash-<id> and
//                           rollback-<id>; never a symlink
//   <store>/migration/lock  flock()ed exclusively by every command that writes
//   <store>/migration/identity  the store's identity marker (see Store::check_catalog)
//   <store>/migration/gc.lock  shared by materialize, exclusive by gc/remove (objects must not vanish
//                           under a reader)
//   <store>/packages/       the store's own description: manifests, refs, settings (store/packages.hpp)
//   <store>/store.db        the catalog (catalog/catalog.hpp); --db may put it elsewhere
#pragma once
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "casmig/cas/object_store.hpp"
#include "casmig/catalog/catalog.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::store {

class PackageIndex;

/// A new store id: 32 lowercase hex digits from getrandom(). Throws util::SystemError.
std::string new_store_id();

/// Names directly under the store that are never package trees.
bool is_reserved(const std::string& name);
/// A package name the store allows: one path component (catalog::is_path_component), not reserved.
bool is_package_name(std::string_view name);

/// What a command is about to do; decides what Store::check_catalog checks and writes.
enum class Purpose {
    read,    // status, plan, materialize: no lock; writes nothing, not even the marker
    write,   // migrate, verify: lock held; claims a new store, brings the marker up to the catalog
    dry_run, // cleanup/gc --dry-run: as write, plus PRAGMA integrity_check
    destroy, // cutover, cleanup, rollback, remove, gc: as dry_run, then the generation advances
    rebuild  // rebuild-catalog: lock held, the catalog is not checked (it is the thing being replaced)
};

enum class LockKind { shared, exclusive };

/// How long taking a lock may wait for its holder (`--lock-wait`, casmig_set_lock_wait()).
struct LockWait {
    std::chrono::milliseconds max{0}; // 0: never wait, a held lock is BusyError at once
    /// Told once, when a wait starts: one line (no prefix) naming the lock file and its holder.
    std::function<void(const std::string&)> waiting;
};

/// An flock() on a lock file, released in the destructor. A held lock is retried (LOCK_NB every
/// 50 ms, so that neither a thread nor a signal is needed and a stop request ends the wait) for up
/// to wait.max, then throws BusyError (exit 4) naming the holder's pid and command when they are
/// known and how long it waited. A stop requested while waiting (util::stop_requested()) throws
/// util::InterruptedError. The exclusive holder writes "casmig <command> pid <pid>" into the file.
class StoreLock {
public:
    StoreLock(const std::string& path, LockKind kind, const std::string& command, const LockWait& wait = {});
    StoreLock(const StoreLock&) = delete;
    StoreLock& operator=(const StoreLock&) = delete;

private:
    util::Fd m_fd;
};

class Store {
public:
    /// Checks that root is an existing directory (UsageError otherwise). Creates nothing.
    Store(std::string root, std::string db_path = {});
    ~Store();

    const std::string& root() const { return m_root; }
    const std::string& db_path() const { return m_db_path; }
    std::string objects_dir() const { return m_root + "/objects"; }
    std::string temp_dir() const { return m_root + "/temp"; }
    std::string migration_dir() const { return m_root + "/migration"; }
    int root_fd() const { return m_root_fd.get(); }
    bool has_catalog() const;

    /// Creates objects/ (with its 256 fan-out directories), temp/, migration/ and packages/ if missing.
    void ensure_layout();
    /// Takes migration/lock exclusively (waiting as set_lock_wait() says), runs check_catalog(purpose) (before anything else is touched),
    /// refuses a temp/ that is a symlink or not a directory (RefusedError), creates the layout, then
    /// removes the staging directories of dead casmig processes from temp/ and reports foreign entries
    /// there to the warning sink (one line). Throws BusyError, RefusedError.
    std::unique_ptr<StoreLock> lock(const std::string& command, Purpose purpose = Purpose::write);
    /// How long lock() (and the lifecycle's migration/gc.lock) waits for a held lock; default: not at all.
    void set_lock_wait(LockWait wait) { m_lock_wait = std::move(wait); }
    const LockWait& lock_wait() const { return m_lock_wait; }
    /// Where lock() reports what is worth a warning but is no failure (one line each, no prefix).
    void set_warning_sink(std::function<void(const std::string&)> sink) { m_warn = std::move(sink); }
    /// Opens the catalog read-write (creating it on a new store), after check_catalog(Purpose::write)
    /// if no writing check ran yet (lock() runs one). Call with the lock held.
    catalog::Catalog& catalog();

    /// A catalog belongs to its store. The store carries an identity marker, migration/identity:
    ///     casmig-store-identity 1
    ///     store_id <32 lowercase hex digits>
    ///     generation <decimal>
    /// and the catalog the same store_id with a generation equal to the marker's or one above it (a
    /// crash between the catalog's commit and the marker's rename). Refuses (util::RefusedError, exit
    /// 3, nothing written) a catalog that is missing, empty, unreadable, without identity, of another
    /// store, older than the marker, or whose marker is gone or behind, when the store holds objects or
    /// manifests or a marker; a catalog naming a package that is not is_package_name; with dry_run and
    /// destroy, a catalog PRAGMA integrity_check finds damaged. A store with neither objects, manifests
    /// nor marker is new: the first writing purpose claims it (random store_id, generation 0; catalog
    /// first, then the marker). A catalog that predates store identities (no identity, has rows, no
    /// marker) is adopted the same way. Writing purposes bring the marker up to the catalog; destroy
    /// then commits the catalog's generation + 1 and writes the marker (a backup of store.db taken
    /// before a destructive command is older after it). Marker writes are durable: migration/
    /// identity.new, fsync, rename, fsync of migration/ (crash points identity.created,
    /// generation.committed, identity.staged, identity.renamed). Purpose read needs no lock; the
    /// others need the lock (lock() calls this).
    void check_catalog(Purpose purpose, const std::string& command);
    /// Why check_catalog(dry_run) would refuse the catalog (its message), or nullopt if the catalog fits
    /// the store. Reads only. For rebuild-catalog, which replaces only a catalog that does not fit.
    std::optional<std::string> catalog_misfit() const;
    /// Writes the identity marker durably (rebuild-catalog, after committing the rebuilt catalog).
    void write_identity(const catalog::Identity& id) { write_marker(id); }
    /// True if objects/ holds any file or packages/ any entry: the store is not new.
    bool holds_data() const;
    /// The identity marker; nullopt if there is none. Throws RefusedError if it is damaged.
    std::optional<catalog::Identity> read_marker() const;
    /// The object store (layout must exist).
    cas::ObjectStore& objects();
    /// packages/ (store/packages.hpp; layout must exist).
    PackageIndex& packages();

    /// Names of the legacy package directories now under the root, sorted.
    std::vector<std::string> legacy_dirs() const;
    /// Adds newly appeared legacy directories as pending and drops pending/failed/rolled_back packages
    /// whose directory vanished. Returns the number added. Call with the lock held.
    int discover();

private:
    void write_marker(const catalog::Identity& id);
    /// Throws RefusedError unless the inspected catalog fits the marker and the store (see check_catalog).
    void judge(const catalog::Inspection& c, const std::optional<catalog::Identity>& marker, bool data) const;

    std::string m_root, m_db_path;
    bool m_checked = false; // check_catalog passed with a writing purpose
    util::Fd m_root_fd;
    std::unique_ptr<catalog::Catalog> m_catalog;
    std::unique_ptr<cas::ObjectStore> m_objects;
    std::unique_ptr<PackageIndex> m_packages;
    std::function<void(const std::string&)> m_warn;
    LockWait m_lock_wait;
};

/// The store's compression mode (cas/compression.hpp): nullopt for a raw store. Read from the catalog's
/// settings row `compression`; throws util::Error if the row is damaged. The one place the setting is
/// read (and write_compression() the one place it is written), so that mirroring it elsewhere in the
/// store is a change here only.
std::optional<cas::Compression> read_compression(catalog::Catalog& cat);
/// Records the compression mode (call inside the caller's Transaction, after the dictionary it names
/// is durable).
void write_compression(catalog::Catalog& cat, const cas::Compression& c);
/// Makes the store raw again (convert --raw): deletes the setting (call inside the caller's Transaction).
void clear_compression(catalog::Catalog& cat);

} // namespace casmig::store
