#include "casmig/catalog/sqlite.hpp"

#include <cerrno>

namespace casmig::catalog {

namespace {

/// The disk (or quota) is full: an I/O error or SQLITE_FULL whose system errno is ENOSPC or EDQUOT.
bool out_of_space(sqlite3* db, int rc) {
    int e = db ? sqlite3_system_errno(db) : 0;
    return ((rc & 0xff) == SQLITE_IOERR || (rc & 0xff) == SQLITE_FULL) && (e == ENOSPC || e == EDQUOT);
}

} // namespace

Db::Db(const std::string& path, OpenMode mode) : m_path(path) {
    std::string first_error;
    try {
        open(mode, WalIndex::shared);
        return;
    } catch (const DbError& e) {
        if (!m_db || !out_of_space(m_db, e.code())) {
            close();
            throw;
        }
        first_error = e.what();
    }
    // The disk is full and this is the catalog's first connection: SQLite must build the WAL index in
    // the -shm file and grow it to 32 KiB, which fails (SQLITE_IOERR_SHMSIZE) — every command, even a
    // read-only status, would die with "disk I/O error". Retry with EXCLUSIVE locking mode set before
    // the first access: SQLite then keeps the WAL index in heap memory and never touches -shm, and
    // still reads the WAL, so nothing committed is missed (unlike immutable=1, which ignores the WAL,
    // or nolock, which would let a writer change the file under the reader).
    // The exclusive lock is only granted while no other connection is open (every WAL-mode connection
    // holds a SHARED lock on the database file), and blocks any other until this one closes: a reader
    // in this mode can never see stale or torn data, because no writer can run meanwhile. The cost is
    // that concurrent commands wait (writers: busy timeout) or fail for as long as this connection
    // lives — acceptable on a full disk, where nothing else can make progress anyway. If another
    // connection holds the catalog (so the -shm exists, sized by it), the normal open is tried again.
    close();
    try {
        open(mode, WalIndex::heap);
        return;
    } catch (const DbError& e) {
        close();
        if ((e.code() & 0xff) != SQLITE_BUSY)
            throw DbError(first_error + "; the disk is full: free space on its filesystem and retry", e.code());
    }
    open(mode, WalIndex::shared);
}

void Db::close() noexcept {
    sqlite3_close_v2(m_db); // NULL is a no-op
    m_db = nullptr;
}

void Db::open(OpenMode mode, WalIndex wal_index) {
    // A read-only connection needs write access for the exclusive lock of WalIndex::heap; query_only
    // and no checkpoint on close keep it from writing anything.
    int flags = mode == OpenMode::read_only && wal_index == WalIndex::shared
                    ? SQLITE_OPEN_READONLY
                    : (SQLITE_OPEN_READWRITE | (mode == OpenMode::read_write ? SQLITE_OPEN_CREATE : 0));
    flags |= SQLITE_OPEN_FULLMUTEX;
    int rc = sqlite3_open_v2(m_path.c_str(), &m_db, flags, nullptr);
    if (rc != SQLITE_OK) {
        std::string msg = m_db ? sqlite3_errmsg(m_db) : sqlite3_errstr(rc);
        close();
        throw DbError("cannot open catalog " + m_path + ": " + msg + " (check the path and its permissions)", rc);
    }
    sqlite3_extended_result_codes(m_db, 1);
    if (wal_index == WalIndex::heap) {
        exec("PRAGMA locking_mode=EXCLUSIVE"); // before the first access, or SQLite uses the -shm
        if (mode == OpenMode::read_only) {
            exec("PRAGMA query_only=1");
            sqlite3_db_config(m_db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr);
        }
    }
    // 60 s: a writer waits this long for another connection's transaction (readers never block in WAL).
    // A reader in heap mode does not wait: a busy catalog means another connection made the -shm.
    sqlite3_busy_timeout(m_db, mode == OpenMode::read_only && wal_index == WalIndex::heap ? 0 : 60'000);
    if (mode == OpenMode::read_write) {
        // WAL: status and other readers never block the migrating writer and vice versa.
        // synchronous=FULL: a commit is durable when it returns (the WAL is fsynced at every commit).
        // Intent records ("tree moved aside", "rollback rebuilt X") must survive a power cut that
        // the act they announce survives; with NORMAL the newest commits could be lost while the
        // renames they describe persist. Migrate commits once a batch, so the cost is one fsync a second.
        exec("PRAGMA journal_mode=WAL");
        exec("PRAGMA synchronous=FULL");
    }
    exec("PRAGMA foreign_keys=ON");
    exec("PRAGMA temp_store=MEMORY");
    // 16 MiB page cache: the objects B-tree is keyed by random digests, so a bigger cache helps lookups
    // only while the table fits; at 1M files 64 MiB of cache was half of migrate's peak RSS (141 MiB;
    // 93 MiB with 16, per-file time within 15% of the 100k store's, docs/benchmarks.md "Scale").
    exec("PRAGMA cache_size=-16384");
    // The first read: opens the WAL and its index now, so that a full disk shows here and not later.
    exec("SELECT count(*) FROM sqlite_schema");
}

Db::~Db() { sqlite3_close_v2(m_db); }

namespace {
/// One line: the SQL of a statement spans lines, and an error must not.
std::string flat(std::string_view sql) {
    std::string out;
    for (char c : sql.substr(0, 200)) {
        if (c == '\n' || c == '\t' || c == '\r') c = ' ';
        if (c == ' ' && (out.empty() || out.back() == ' ')) continue;
        out += c;
        if (out.size() == 80) break;
    }
    return out;
}
/// What to do, for the errors that mean the file itself is damaged.
std::string advice(int rc) {
    const int primary = rc & 0xff;
    return primary == SQLITE_CORRUPT || primary == SQLITE_NOTADB
               ? std::string("; the catalog is damaged (casmig doctor says more): restore a current backup of store.db, "
                             "or run casmig rebuild-catalog")
               : std::string();
}
} // namespace

void Db::fail(const std::string& what, int rc, std::string_view sql) const {
    std::string msg = what + " in catalog " + m_path + ": " + sqlite3_errmsg(m_db);
    if (!sql.empty()) msg += " (SQL: " + flat(sql) + ")";
    throw DbError(msg + advice(rc), rc);
}

void Db::exec(const std::string& sql) {
    char* err = nullptr;
    int rc = sqlite3_exec(m_db, sql.c_str(), nullptr, nullptr, &err);
    if (rc != SQLITE_OK) {
        std::string msg = err ? err : sqlite3_errstr(rc);
        sqlite3_free(err);
        throw DbError("catalog " + m_path + ": " + msg + " (SQL: " + flat(sql) + ")" + advice(rc), rc);
    }
}

Stmt::Stmt(Db& db, const std::string& sql) : m_db(db), m_sql(sql) {
    int rc = sqlite3_prepare_v3(db.handle(), sql.c_str(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                                &m_stmt, nullptr);
    if (rc != SQLITE_OK) db.fail("cannot prepare statement", rc, sql);
}

Stmt::~Stmt() { sqlite3_finalize(m_stmt); }

Stmt& Stmt::bind(int i, std::int64_t v) {
    sqlite3_bind_int64(m_stmt, i, v);
    return *this;
}
Stmt& Stmt::bind(int i, std::string_view text) {
    sqlite3_bind_text(m_stmt, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
    return *this;
}
Stmt& Stmt::bind_blob(int i, std::string_view bytes) {
    // a zero-length blob must still be a BLOB, not NULL: the package root's path is ""
    sqlite3_bind_blob(m_stmt, i, bytes.empty() ? "" : bytes.data(), static_cast<int>(bytes.size()), SQLITE_TRANSIENT);
    return *this;
}
Stmt& Stmt::bind_null(int i) {
    sqlite3_bind_null(m_stmt, i);
    return *this;
}

bool Stmt::step() {
    int rc = sqlite3_step(m_stmt);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    sqlite3_reset(m_stmt);
    m_db.fail("statement failed", rc, m_sql);
}

void Stmt::run() {
    while (step()) {
    }
    reset();
}

void Stmt::reset() {
    sqlite3_reset(m_stmt);
    sqlite3_clear_bindings(m_stmt);
}

std::string Stmt::str(int col) const {
    auto p = static_cast<const char*>(sqlite3_column_blob(m_stmt, col));
    int n = sqlite3_column_bytes(m_stmt, col);
    return p ? std::string(p, static_cast<size_t>(n)) : std::string();
}

Transaction::Transaction(Db& db) : m_db(db) { m_db.exec("BEGIN IMMEDIATE"); }

Transaction::~Transaction() {
    if (!m_done) {
        // Destructors never throw: a failed ROLLBACK leaves SQLite to roll back on the next open.
        sqlite3_exec(m_db.handle(), "ROLLBACK", nullptr, nullptr, nullptr);
    }
}

void Transaction::commit() {
    m_db.exec("COMMIT");
    m_done = true;
}

RelaxedDurability::RelaxedDurability(Db& db) : m_db(db) { m_db.exec("PRAGMA synchronous=NORMAL"); }

RelaxedDurability::~RelaxedDurability() {
    try {
        m_db.exec("PRAGMA synchronous=FULL");
    } catch (const DbError&) {
        // The connection is being torn down after a failure; the next one starts FULL.
    }
}

} // namespace casmig::catalog
