// casmig::catalog — owned SQLite handles: connection, prepared statement, transaction.
#pragma once
#include <cstdint>
#include <optional>
#include <sqlite3.h>
#include <string>
#include <string_view>

#include "casmig/util/error.hpp"

namespace casmig::catalog {

/// A failed SQLite call: records the result code, the SQL and the database path.
class DbError : public util::Error {
public:
    DbError(const std::string& what, int code) : util::Error(what), m_code(code) {}
    int code() const noexcept { return m_code; }

private:
    int m_code;
};

enum class OpenMode { read_only, read_write };

class Stmt;

/// One connection. Pragmas (WAL, busy timeout, foreign keys, synchronous) are set on every open.
/// On a full disk, where SQLite cannot create the WAL index (-shm) for the first connection, the
/// connection keeps the index in memory under an exclusive lock instead (see the constructor).
class Db {
public:
    Db(const std::string& path, OpenMode mode);
    ~Db();
    Db(const Db&) = delete;
    Db& operator=(const Db&) = delete;
    void exec(const std::string& sql);
    sqlite3* handle() const { return m_db; }
    const std::string& path() const { return m_path; }
    [[noreturn]] void fail(const std::string& what, int rc, std::string_view sql = {}) const;

private:
    enum class WalIndex { shared, heap }; // in the -shm file (normal), or in memory (full disk)
    void open(OpenMode mode, WalIndex wal_index);
    void close() noexcept;
    sqlite3* m_db = nullptr;
    std::string m_path;
};

/// A prepared statement; reset after every use via rows()/run(). Bind indexes start at 1.
class Stmt {
public:
    Stmt(Db& db, const std::string& sql);
    ~Stmt();
    Stmt(const Stmt&) = delete;
    Stmt& operator=(const Stmt&) = delete;

    Stmt& bind(int i, std::int64_t v);
    Stmt& bind(int i, std::string_view text);           // TEXT
    Stmt& bind_blob(int i, std::string_view bytes);     // BLOB
    Stmt& bind_null(int i);
    /// Steps once; true if a row is available.
    bool step();
    /// Steps to completion (for writes), then resets.
    void run();
    void reset();

    std::int64_t i64(int col) const { return sqlite3_column_int64(m_stmt, col); }
    bool is_null(int col) const { return sqlite3_column_type(m_stmt, col) == SQLITE_NULL; }
    std::string str(int col) const;  // TEXT or BLOB bytes
    std::optional<std::string> opt_str(int col) const {
        return is_null(col) ? std::nullopt : std::optional<std::string>(str(col));
    }

private:
    Db& m_db;
    sqlite3_stmt* m_stmt = nullptr;
    std::string m_sql;
};

/// BEGIN IMMEDIATE in the constructor; ROLLBACK in the destructor unless commit() was called.
class Transaction {
public:
    explicit Transaction(Db& db);
    ~Transaction();
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit();

private:
    Db& m_db;
    bool m_done = false;
};

/// For its lifetime, commits on db are not fsynced one by one (PRAGMA synchronous=NORMAL; FULL, the
/// default, again afterwards). For commands whose commits record results of data already durable —
/// migrate, verify — where a commit lost to a power cut only means work redone: on this kind of VM an
/// fsync per package costs more than the work. A later FULL commit makes everything before it durable
/// (the WAL is append-only). Never around an intent that a destructive step relies on.
class RelaxedDurability {
public:
    explicit RelaxedDurability(Db& db);
    ~RelaxedDurability();
    RelaxedDurability(const RelaxedDurability&) = delete;
    RelaxedDurability& operator=(const RelaxedDurability&) = delete;

private:
    Db& m_db;
};

} // namespace casmig::catalog
