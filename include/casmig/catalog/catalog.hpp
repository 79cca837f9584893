// casmig::catalog — the SQLite catalog (store.db): packages and their states, manifests, objects,
// store settings and the journal. Schema and migrations: src/catalog/schema.cpp, docs/catalog.md.
//
// Locking: a Catalog opened read_write is used only by a process holding the store lock
// (store::StoreLock); read_only catalogs (status) take no lock and never block (WAL).
// A Catalog is not shared between threads without the caller's own mutex.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "casmig/catalog/sqlite.hpp"
#include "casmig/hash/blake3.hpp"

namespace casmig::catalog {

enum class PackageState { pending, in_progress, migrated, verified, failed, rolled_back };
enum class TreeState { present, marked, removed };
enum class StoreMode { legacy, dual, file_level };
enum class EntryType { file = 1, dir = 2, symlink = 3 };

const char* to_string(PackageState s);
const char* to_string(TreeState s);
const char* to_string(StoreMode m);
PackageState package_state_from(const std::string& s);
TreeState tree_state_from(const std::string& s);
StoreMode store_mode_from(const std::string& s);

/// One manifest row. `path` is the byte path relative to the package root ("" is the root itself).
struct Entry {
    std::string path;
    EntryType type = EntryType::file;
    std::uint32_t mode = 0;          // the 07777 bits
    std::uint64_t size = 0;          // files: content bytes; symlinks: target length; dirs: 0
    std::optional<hash::Digest> digest; // files only
    std::string target;              // symlinks only: target bytes, verbatim
    std::int64_t mtime_ns = 0;
    std::uint32_t uid = 0, gid = 0;  // owner, restored when casmig runs as root
    std::optional<std::string> link_to; // files only: an earlier path of the same package this is a hard link of
    std::string xattrs;              // files and dirs: extended attributes (util/xattr.hpp encoding), "" if none
};

struct Package {
    std::int64_t id = 0;
    std::string name;                // the legacy directory name (bytes)
    PackageState state = PackageState::pending;
    TreeState tree = TreeState::present;
    bool has_manifest = false;
    std::int64_t files = 0;
    std::int64_t bytes = 0;
    std::string error;
};

struct ObjectRow {
    hash::Digest digest;
    std::int64_t size = 0;
    std::int64_t stored_size = 0;
};

struct Totals {
    std::int64_t files = 0, logical_bytes = 0, objects = 0, stored_bytes = 0;
};

/// Latest schema version (PRAGMA user_version after all migrations).
int schema_version();

class Catalog {
public:
    /// Opens (and with read_write creates and migrates) the catalog at `path`.
    Catalog(const std::string& path, OpenMode mode);
    ~Catalog();

    Db& db() { return m_db; }

    StoreMode mode();
    void set_mode(StoreMode m);

    std::vector<Package> packages();
    std::optional<Package> package(const std::string& name);
    /// Inserts a new pending package; returns its id.
    std::int64_t add_package(const std::string& name);
    void set_state(std::int64_t id, PackageState s, const std::string& error = {});
    void set_tree(std::int64_t id, TreeState t);
    void delete_package(std::int64_t id);

    /// Replaces a package's manifest (entries) and records files/bytes; does not change its state.
    void put_manifest(std::int64_t id, const std::vector<Entry>& entries);
    std::vector<Entry> manifest(std::int64_t id);
    /// Deletes a package's manifest entries and clears has_manifest.
    void clear_manifest(std::int64_t id);

    void add_object(const ObjectRow& o);
    bool has_object(const hash::Digest& d);
    std::vector<ObjectRow> objects();
    void delete_object(const hash::Digest& d);
    /// Digests referenced by no manifest entry.
    std::vector<ObjectRow> unreferenced_objects();

    Totals totals();

    /// Appends a journal row: who (user and pid), command, package, old and new state, detail.
    void journal(const std::string& command, const std::string& package, const std::string& from,
                 const std::string& to, const std::string& detail = {});
    struct JournalRow {
        std::int64_t at_ns;
        std::string who, command, package, from, to, detail;
    };
    std::vector<JournalRow> journal_tail(int n);

private:
    Db m_db;
    struct Stmts;
    std::unique_ptr<Stmts> m_s;
    std::string m_who;
};

} // namespace casmig::catalog
