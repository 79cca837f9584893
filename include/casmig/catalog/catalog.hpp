// casmig::catalog — the SQLite catalog (store.db): packages and their states, manifests, objects,
// store settings and the journal. Schema and migrations: src/catalog/schema.cpp, docs/catalog.md.
//
// Locking: a Catalog opened read_write is used only by a process holding the store lock
// (store::StoreLock); read_only catalogs (status) take no lock and never block (WAL).
// A Catalog is not shared between threads without the caller's own mutex.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "casmig/catalog/sqlite.hpp"
#include "casmig/hash/blake3.hpp"
#include "casmig/manifest/manifest.hpp"

namespace casmig::catalog {

enum class PackageState { pending, in_progress, migrated, verified, failed, rolled_back };
enum class TreeState { present, marked, removed };
enum class StoreMode { legacy, dual, file_level };

const char* to_string(PackageState s);
const char* to_string(TreeState s);
const char* to_string(StoreMode m);
PackageState package_state_from(const std::string& s);
TreeState tree_state_from(const std::string& s);
StoreMode store_mode_from(const std::string& s);

/// One manifest row (the manifest area owns the type).
using Entry = manifest::Entry;
using manifest::EntryType;

/// The hard-link group id of the inode (dev, ino): 63 bits of BLAKE3 of both, never negative.
std::int64_t xlink_group(std::uint64_t dev, std::uint64_t ino);

struct Package {
    std::int64_t id = 0;
    std::string name;                // the legacy directory name (bytes)
    PackageState state = PackageState::pending;
    TreeState tree = TreeState::present;
    bool has_manifest = false;
    std::int64_t files = 0;
    std::int64_t bytes = 0;
    std::string error;
    /// The manifest object under packages/manifests/ holding this manifest (store/packages.hpp);
    /// nullopt while it is not written yet (a catalog from before schema 0003) or without manifest.
    std::optional<hash::Digest> manifest_object;
    /// The first problem of the last verify that failed for this package while its manifest was the
    /// truth (verified, store file-level: its state stays verified, schema 0006); "" when none, or
    /// since a verify passed or its state changed. verify_failed_at_ns: when (unix ns), 0 when none.
    std::string verify_error;
    std::int64_t verify_failed_at_ns = 0;
};

struct ObjectRow {
    hash::Digest digest;
    std::int64_t size = 0;
    std::int64_t stored_size = 0;
};

struct Totals {
    std::int64_t files = 0, logical_bytes = 0, objects = 0, stored_bytes = 0;
    std::int64_t object_bytes = 0; // uncompressed bytes of the distinct contents (stored_bytes is on disk)
};

/// Latest schema version (PRAGMA user_version after all migrations).
int schema_version();

/// The way back from a catalog that does not fit its store; every such message ends with it.
inline constexpr const char* k_recover_catalog = "restore a current backup of store.db, or run casmig rebuild-catalog";

/// The store a catalog belongs to (table store_identity, docs/catalog.md). The same pair sits in the
/// store's identity marker (store/store.hpp); the catalog's generation is the marker's or one above it.
struct Identity {
    std::string store_id;        // 32 lowercase hex digits, random, fixed for the store's life
    std::int64_t generation = 0; // advanced at the start of every destructive command
};

/// True if `name` is one path component: not empty, not "." or "..", no '/', no NUL, at most 255 bytes.
/// Every package name read from the catalog must be (a row that is not makes the read throw
/// util::RefusedError); the store adds its reserved names (store::is_package_name).
bool is_path_component(std::string_view name);

/// What a catalog file is, found without changing it: a read-only connection (which never
/// checkpoints a WAL into the file) and no schema migration.
struct Inspection {
    enum class Kind {
        missing,    // no file at the path
        empty,      // 0 bytes, or a database with no tables
        unreadable, // not a SQLite database, or damaged beyond reading (`problem` says how)
        unclaimed,  // a catalog without a store identity (made before schema 0002, or never claimed)
        claimed     // a catalog with its store identity
    };
    Kind kind = Kind::missing;
    std::string problem;                  // unreadable: SQLite's reason
    int version = 0;                      // PRAGMA user_version
    std::optional<Identity> identity;     // claimed only
    bool has_rows = false;                // any package or object row
    std::optional<std::string> bad_name;  // the first package name `name_ok` rejects
    std::string integrity;                // PRAGMA integrity_check's first complaint; "" if ok or not asked
};
enum class IntegrityCheck { no, yes };
/// Inspects the catalog at `path`. Never throws for a damaged file (kind unreadable); throws
/// util::SystemError only when the path cannot be examined at all. With IntegrityCheck::yes runs
/// PRAGMA integrity_check (not quick_check: that one misses index entries that disagree with their
/// table, which is what a foreign -wal merged into a restored file leaves; the catalog's big tables
/// have no secondary index, so the difference costs little).
Inspection inspect(const std::string& path, IntegrityCheck check, const std::function<bool(std::string_view)>& name_ok);

class Catalog {
public:
    /// Opens (and with read_write creates and migrates) the catalog at `path`.
    Catalog(const std::string& path, OpenMode mode);
    ~Catalog();

    Db& db() { return m_db; }

    StoreMode mode();
    void set_mode(StoreMode m);
    /// A row of the settings table (key → value); nullopt if the key has none.
    std::optional<std::string> setting(std::string_view key);
    /// Inserts or replaces a settings row (call inside a Transaction to make it atomic with others).
    void set_setting(std::string_view key, std::string_view value);
    /// Deletes a settings row (no-op if there is none).
    void delete_setting(std::string_view key);

    /// This catalog's store identity; nullopt until claimed.
    std::optional<Identity> identity();
    /// Records the store identity (a catalog is claimed once; a second claim throws DbError).
    void claim(const Identity& id);
    /// Sets the generation to the current one plus one and returns it (call inside a Transaction).
    std::int64_t advance_generation();

    /// Throws util::RefusedError if a row's name is not a single path component (is_path_component).
    std::vector<Package> packages();
    std::optional<Package> package(const std::string& name);
    /// Inserts a new pending package; returns its id.
    std::int64_t add_package(const std::string& name);
    void set_state(std::int64_t id, PackageState s, const std::string& error = {});
    /// Records (error not empty) or clears (empty) a failed verify of a package whose state stays verified.
    void set_verify_failure(std::int64_t id, const std::string& error);
    void set_tree(std::int64_t id, TreeState t);
    void delete_package(std::int64_t id);

    /// Replaces a package's manifest (entries, normalized: manifest::normalize) and records files/bytes
    /// and the manifest object that holds it (written and durable before this is committed); does not
    /// change its state.
    void put_manifest(std::int64_t id, const std::vector<Entry>& entries, const std::optional<hash::Digest>& object);
    /// Records the manifest object of a package that has a manifest (backfill of older catalogs).
    void set_manifest_object(std::int64_t id, const hash::Digest& object);
    /// With `stored`: also, for each entry in the same order, the stored size (bytes on disk) of its
    /// object as the objects table records it, or -1 (not a file, no row, or a row of another size).
    std::vector<Entry> manifest(std::int64_t id, std::vector<std::int64_t>* stored = nullptr);
    /// Deletes a package's manifest entries and clears has_manifest.
    void clear_manifest(std::int64_t id);

    void add_object(const ObjectRow& o);
    /// Records the bytes the object now takes on disk (convert: after its new form is durable and the
    /// old one gone). No-op for a digest without a row.
    void set_stored_size(const hash::Digest& d, std::int64_t stored_size);
    bool has_object(const hash::Digest& d);
    /// True if the objects table has any row (one index probe, whatever the store's size).
    bool has_any_object();
    /// The detail of the newest journal row of command for package that is not an intent ("intent: …"
    /// rows announce; the others say what happened), if any.
    std::optional<std::string> last_outcome(const std::string& command, const std::string& package);
    std::vector<ObjectRow> objects();
    /// Calls f for every row of the objects table, one at a time (memory does not grow with the
    /// store). f must not change the catalog.
    void for_each_object(const std::function<void(const ObjectRow&)>& f);
    void delete_object(const hash::Digest& d);
    /// Calls f once for every distinct digest some manifest entry refers to (one scan of entries).
    void for_each_referenced_digest(const std::function<void(const hash::Digest&)>& f);
    /// The packages whose manifest refers to digest d (one scan of entries: no index on digests).
    std::vector<Package> packages_needing(const hash::Digest& d);
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
    /// Every journal row of the newest run of `command` (the rows written by the process, user@host
    /// pid N, that wrote the newest such row), oldest first.
    std::vector<JournalRow> last_run(const std::string& command);

private:
    Db m_db;
    struct Stmts;
    std::unique_ptr<Stmts> m_s;
    std::string m_who;
};

/// Read-only connections to one catalog, for lookups from many threads at once while another
/// connection writes (WAL: readers never block the writer or each other). Each call borrows a
/// connection (opened on first need, at most one per concurrent caller) and gives it back.
class ReaderPool {
public:
    /// Page cache of each pooled connection, KiB.
    static constexpr int k_reader_cache_kib = 2048;
    explicit ReaderPool(std::string path) : m_path(std::move(path)) {}
    /// Catalog::has_object through a borrowed connection; sees committed rows only. Thread-safe.
    bool has_object(const hash::Digest& d);

private:
    std::string m_path;
    std::mutex m_mutex;
    std::vector<std::unique_ptr<Catalog>> m_free;
};

} // namespace casmig::catalog
