// casmig::store — the store's layout on disk, its lock, and discovery of legacy package trees.
//
//   <store>/<package-id>/   legacy trees: directories not starting with '.' and not reserved
//   <store>/objects/        the CAS (see cas/object_store.hpp)
//   <store>/temp/           staging for atomic writes (cas/object_store.hpp, "temp/"): each writing
//                           process's own locked casmig-<pid>-<rand>/, the lifecycle's trash-<id> and
//                           rollback-<id>; never a symlink
//   <store>/migration/lock  flock()ed exclusively by every command that writes
//   <store>/migration/gc.lock  shared by materialize, exclusive by gc/remove (objects must not vanish
//                           under a reader)
//   <store>/packages/       reserved
//   <store>/store.db        the catalog (catalog/catalog.hpp); --db may put it elsewhere
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "casmig/cas/object_store.hpp"
#include "casmig/catalog/catalog.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::store {

/// Names directly under the store that are never package trees.
bool is_reserved(const std::string& name);

enum class LockKind { shared, exclusive };

/// An flock() on a lock file, released in the destructor. Never waits: a held lock throws BusyError
/// (exit 4) naming the holder's pid when it is known.
class StoreLock {
public:
    StoreLock(const std::string& path, LockKind kind, const std::string& command);
    StoreLock(const StoreLock&) = delete;
    StoreLock& operator=(const StoreLock&) = delete;

private:
    util::Fd m_fd;
};

class Store {
public:
    /// Checks that root is an existing directory (UsageError otherwise). Creates nothing.
    Store(std::string root, std::string db_path = {});

    const std::string& root() const { return m_root; }
    const std::string& db_path() const { return m_db_path; }
    std::string objects_dir() const { return m_root + "/objects"; }
    std::string temp_dir() const { return m_root + "/temp"; }
    std::string migration_dir() const { return m_root + "/migration"; }
    int root_fd() const { return m_root_fd.get(); }
    bool has_catalog() const;

    /// Creates objects/ (with its 256 fan-out directories), temp/, migration/ and packages/ if missing.
    void ensure_layout();
    /// Takes migration/lock exclusively (creating the layout first), then removes the staging
    /// directories of dead casmig processes from temp/ and reports foreign entries there to the warning
    /// sink (one line). Throws BusyError; RefusedError if temp/ is a symlink or not a directory.
    std::unique_ptr<StoreLock> lock(const std::string& command);
    /// Where lock() reports what is worth a warning but is no failure (one line each, no prefix).
    void set_warning_sink(std::function<void(const std::string&)> sink) { m_warn = std::move(sink); }
    /// Opens (creating if needed) the catalog read-write. Call with the lock held.
    catalog::Catalog& catalog();
    /// The object store (layout must exist).
    cas::ObjectStore& objects();

    /// Names of the legacy package directories now under the root, sorted.
    std::vector<std::string> legacy_dirs() const;
    /// Adds newly appeared legacy directories as pending and drops pending/failed/rolled_back packages
    /// whose directory vanished. Returns the number added. Call with the lock held.
    int discover();

private:
    std::string m_root, m_db_path;
    util::Fd m_root_fd;
    std::unique_ptr<catalog::Catalog> m_catalog;
    std::unique_ptr<cas::ObjectStore> m_objects;
    std::function<void(const std::string&)> m_warn;
};

} // namespace casmig::store
