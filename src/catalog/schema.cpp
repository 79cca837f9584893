#include "schema.hpp"

namespace casmig::catalog::detail {

const std::vector<Migration>& migrations() {
    static const std::vector<Migration> k_migrations = {
        {"0001-initial", R"SQL(
CREATE TABLE schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  INTEGER NOT NULL          -- unix seconds
);
CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);
INSERT INTO settings(key, value) VALUES ('mode', 'legacy');
CREATE TABLE packages (
    id          INTEGER PRIMARY KEY,
    name        BLOB NOT NULL UNIQUE,     -- legacy directory name, bytes
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending','in_progress','migrated','verified','failed','rolled_back')),
    tree        TEXT NOT NULL DEFAULT 'present' CHECK (tree IN ('present','marked','removed')),
    has_manifest INTEGER NOT NULL DEFAULT 0,
    files       INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    updated_at  INTEGER NOT NULL DEFAULT 0 -- unix ns
);
CREATE TABLE entries (
    package     INTEGER NOT NULL REFERENCES packages(id) ON DELETE CASCADE,
    path        BLOB NOT NULL,            -- relative to the package root; '' is the root
    type        INTEGER NOT NULL CHECK (type IN (1, 2, 3)),  -- 1 file, 2 dir, 3 symlink
    mode        INTEGER NOT NULL,         -- 07777 bits
    size        INTEGER NOT NULL,
    digest      BLOB,                     -- 32 bytes BLAKE3-256, files only
    target      BLOB,                     -- symlinks only
    mtime_ns    INTEGER NOT NULL,
    uid         INTEGER NOT NULL DEFAULT 0,
    gid         INTEGER NOT NULL DEFAULT 0,
    link_to     BLOB,                     -- files only: earlier path of the same inode in this package
    xattrs      BLOB,                     -- extended attributes, encoded as in util/xattr.hpp; NULL: none
    PRIMARY KEY (package, path)
) WITHOUT ROWID;
-- No index on entries(digest): digests are random, so such an index would dirty most of its pages
-- in every batch; gc and fsck scan entries once instead.
CREATE TABLE objects (
    digest      BLOB PRIMARY KEY,         -- 32 bytes
    size        INTEGER NOT NULL,         -- uncompressed bytes
    stored_size INTEGER NOT NULL          -- bytes on disk under objects/
) WITHOUT ROWID;
CREATE TABLE journal (
    id          INTEGER PRIMARY KEY,
    at_ns       INTEGER NOT NULL,
    who         TEXT NOT NULL,            -- user@host pid N
    command     TEXT NOT NULL,
    package     TEXT,
    from_state  TEXT,
    to_state    TEXT,
    detail      TEXT
);
)SQL"},
        // The store identity the catalog belongs to (store/store.hpp, docs/catalog.md): one row, written
        // when a store is first used (or when a catalog from before this migration is adopted), its
        // generation advanced at the start of every destructive command. Empty until then.
        {"0002-store-identity", R"SQL(
CREATE TABLE store_identity (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    store_id    TEXT NOT NULL,            -- 32 lowercase hex digits, as in <store>/migration/identity
    generation  INTEGER NOT NULL          -- advanced before every destructive command touches anything
);
)SQL"},
        // The manifest object in <store>/packages/manifests/ that holds each package's manifest in the
        // canonical encoding (docs/format.md), named by its BLAKE3; NULL until it is written (catalogs
        // from before this migration: written by the next locked command, store/packages.hpp).
        {"0003-manifest-objects", R"SQL(
ALTER TABLE packages ADD COLUMN manifest BLOB;  -- 32 bytes, or NULL
)SQL"},
        // Hard-link groups that span packages (catalog::Entry::xlink): NULL for every entry of a catalog
        // made before, which rollback then treats as before (each package's files its own).
        {"0004-cross-package-links", R"SQL(
ALTER TABLE entries ADD COLUMN xlink INTEGER; -- files only: hard-link group across packages, NULL if none
)SQL"},
        // The objects table's count and sums, kept by triggers in the same transactions as its rows, so
        // that status costs what the packages table costs, not a scan of every object (issue 9).
        {"0005-object-totals", R"SQL(
CREATE TABLE object_totals (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    objects     INTEGER NOT NULL,         -- COUNT(*) FROM objects
    bytes       INTEGER NOT NULL,         -- SUM(size)
    stored      INTEGER NOT NULL          -- SUM(stored_size)
);
INSERT INTO object_totals(one, objects, bytes, stored)
    SELECT 1, COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(stored_size), 0) FROM objects;
CREATE TRIGGER object_totals_insert AFTER INSERT ON objects BEGIN
    UPDATE object_totals SET objects = objects + 1, bytes = bytes + NEW.size, stored = stored + NEW.stored_size;
END;
CREATE TRIGGER object_totals_delete AFTER DELETE ON objects BEGIN
    UPDATE object_totals SET objects = objects - 1, bytes = bytes - OLD.size, stored = stored - OLD.stored_size;
END;
CREATE TRIGGER object_totals_update AFTER UPDATE OF size, stored_size ON objects BEGIN
    UPDATE object_totals SET bytes = bytes - OLD.size + NEW.size, stored = stored - OLD.stored_size + NEW.stored_size;
END;
)SQL"},
        // A verify that fails for a package whose manifest is the truth (verified, after cutover) leaves
        // its state verified (the manifest still says what it is) but must not be forgotten: status,
        // list, doctor and the metrics show it until a verify passes or the state changes (issue 10).
        {"0006-verify-failures", R"SQL(
ALTER TABLE packages ADD COLUMN verify_error TEXT;        -- first problem, one line; NULL: none
ALTER TABLE packages ADD COLUMN verify_failed_at INTEGER; -- unix ns of that verify; NULL: none
)SQL"},
    };
    return k_migrations;
}

} // namespace casmig::catalog::detail
