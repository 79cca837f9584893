#include "casmig/catalog/catalog.hpp"

#include "casmig/util/fd.hpp"
#include "schema.hpp"

#include <cerrno>
#include <chrono>
#include <ctime>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::catalog {

const char* to_string(PackageState s) {
    switch (s) {
    case PackageState::pending: return "pending";
    case PackageState::in_progress: return "in_progress";
    case PackageState::migrated: return "migrated";
    case PackageState::verified: return "verified";
    case PackageState::failed: return "failed";
    case PackageState::rolled_back: return "rolled_back";
    }
    return "?";
}
const char* to_string(TreeState s) {
    switch (s) {
    case TreeState::present: return "present";
    case TreeState::marked: return "marked";
    case TreeState::removed: return "removed";
    }
    return "?";
}
const char* to_string(StoreMode m) {
    switch (m) {
    case StoreMode::legacy: return "legacy";
    case StoreMode::dual: return "dual";
    case StoreMode::file_level: return "file-level";
    }
    return "?";
}
PackageState package_state_from(const std::string& s) {
    for (auto v : {PackageState::pending, PackageState::in_progress, PackageState::migrated, PackageState::verified,
                   PackageState::failed, PackageState::rolled_back})
        if (s == to_string(v)) return v;
    throw util::Error("catalog holds an unknown package state '" + s + "': the catalog is newer than this casmig");
}
TreeState tree_state_from(const std::string& s) {
    for (auto v : {TreeState::present, TreeState::marked, TreeState::removed})
        if (s == to_string(v)) return v;
    throw util::Error("catalog holds an unknown tree state '" + s + "': the catalog is newer than this casmig");
}
StoreMode store_mode_from(const std::string& s) {
    for (auto v : {StoreMode::legacy, StoreMode::dual, StoreMode::file_level})
        if (s == to_string(v)) return v;
    throw util::Error("catalog holds an unknown store mode '" + s + "': the catalog is newer than this casmig");
}

int schema_version() { return static_cast<int>(detail::migrations().size()); }

std::int64_t xlink_group(std::uint64_t dev, std::uint64_t ino) {
    // Hashed, not packed: st_dev and st_ino are both 64 bits wide. A collision would only put two
    // inodes in one group, which rollback's proof of equality then keeps apart.
    unsigned char in[16];
    for (int i = 0; i < 8; ++i) {
        in[i] = static_cast<unsigned char>(dev >> (8 * i));
        in[8 + i] = static_cast<unsigned char>(ino >> (8 * i));
    }
    auto d = hash::hash_bytes(std::string_view(reinterpret_cast<const char*>(in), sizeof in));
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(d.bytes[i]) << (8 * i);
    return static_cast<std::int64_t>(v >> 1);
}

bool is_path_component(std::string_view name) {
    return !name.empty() && name != "." && name != ".." && name.size() <= 255 &&
           name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

static bool has_table(Db& db, const char* name) {
    Stmt s(db, "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?");
    s.bind(1, std::string_view(name));
    bool r = s.step();
    s.reset();
    return r;
}

Inspection inspect(const std::string& path, IntegrityCheck check, const std::function<bool(std::string_view)>& name_ok) {
    Inspection r;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) return r;
        util::throw_errno("cannot examine catalog", path);
    }
    if (S_ISREG(st.st_mode) && st.st_size == 0) {
        r.kind = Inspection::Kind::empty;
        return r;
    }
    try {
        Db db(path, OpenMode::read_only);
        {
            Stmt v(db, "PRAGMA user_version");
            v.step();
            r.version = static_cast<int>(v.i64(0));
            v.reset();
        }
        {
            Stmt t(db, "SELECT count(*) FROM sqlite_master");
            t.step();
            bool no_tables = t.i64(0) == 0;
            t.reset();
            if (no_tables) {
                r.kind = Inspection::Kind::empty;
                return r;
            }
        }
        if (check == IntegrityCheck::yes) {
            Stmt ic(db, "PRAGMA integrity_check");
            if (ic.step() && ic.str(0) != "ok") r.integrity = ic.str(0);
            ic.reset();
        }
        r.kind = Inspection::Kind::unclaimed;
        if (has_table(db, "store_identity")) {
            Stmt id(db, "SELECT store_id, generation FROM store_identity WHERE one=1");
            if (id.step()) {
                r.identity = Identity{id.str(0), id.i64(1)};
                r.kind = Inspection::Kind::claimed;
            }
            id.reset();
        }
        if (has_table(db, "packages")) {
            Stmt n(db, "SELECT name FROM packages");
            while (n.step()) {
                r.has_rows = true;
                if (!r.bad_name && name_ok && !name_ok(n.str(0))) r.bad_name = n.str(0);
            }
            n.reset();
        }
        if (!r.has_rows && has_table(db, "objects")) {
            Stmt o(db, "SELECT 1 FROM objects LIMIT 1");
            r.has_rows = o.step();
            o.reset();
        }
    } catch (const DbError& e) {
        // A file SQLite cannot read (not a database, truncated, malformed) is a finding, not a failure.
        r = Inspection{};
        r.kind = Inspection::Kind::unreadable;
        r.problem = sqlite3_errstr(e.code());
    }
    return r;
}

static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

static int user_version(Db& db) {
    Stmt s(db, "PRAGMA user_version");
    s.step();
    return static_cast<int>(s.i64(0));
}

static void migrate_schema(Db& db) {
    const auto& ms = detail::migrations();
    for (;;) {
        Transaction tx(db); // BEGIN IMMEDIATE: two processes never apply the same migration twice
        int v = user_version(db);
        if (v > static_cast<int>(ms.size()))
            throw util::Error("catalog " + db.path() + " has schema version " + std::to_string(v) +
                              ", newer than this casmig understands (" + std::to_string(ms.size()) +
                              "): upgrade casmig");
        if (v == static_cast<int>(ms.size())) return;
        db.exec(ms[static_cast<size_t>(v)].sql);
        Stmt ins(db, "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)");
        ins.bind(1, v + 1).bind(2, std::string_view(ms[static_cast<size_t>(v)].name)).bind(3, std::int64_t(::time(nullptr)));
        ins.run();
        db.exec("PRAGMA user_version=" + std::to_string(v + 1));
        tx.commit();
    }
}

struct Catalog::Stmts {
    explicit Stmts(Db& db)
        : get_mode(db, "SELECT value FROM settings WHERE key='mode'"),
          set_mode(db, "INSERT INTO settings(key, value) VALUES ('mode', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value"),
          packages(db, "SELECT id, name, state, tree, has_manifest, files, bytes, COALESCE(error,''), manifest, COALESCE(verify_error,''), COALESCE(verify_failed_at,0) FROM packages ORDER BY name"),
          package(db, "SELECT id, name, state, tree, has_manifest, files, bytes, COALESCE(error,''), manifest, COALESCE(verify_error,''), COALESCE(verify_failed_at,0) FROM packages WHERE name=?"),
          add_package(db, "INSERT INTO packages(name, state, updated_at) VALUES (?, 'pending', ?)"),
          // A new state is a new truth: a failure of verify after cutover (0006) was about the old one.
          set_state(db, "UPDATE packages SET state=?, error=?, updated_at=?, verify_error=NULL, verify_failed_at=NULL WHERE id=?"),
          set_verify_failure(db, "UPDATE packages SET verify_error=?, verify_failed_at=? WHERE id=?"),
          set_tree(db, "UPDATE packages SET tree=?, updated_at=? WHERE id=?"),
          del_package(db, "DELETE FROM packages WHERE id=?"),
          del_entries(db, "DELETE FROM entries WHERE package=?"),
          ins_entry(db, "INSERT INTO entries(package, path, type, mode, size, digest, target, mtime_ns, link_to, uid, gid, xattrs, xlink) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"),
          set_manifest(db, "UPDATE packages SET has_manifest=1, files=?, bytes=?, manifest=?, updated_at=? WHERE id=?"),
          clear_manifest(db, "UPDATE packages SET has_manifest=0, files=0, bytes=0, manifest=NULL WHERE id=?"),
          set_manifest_object(db, "UPDATE packages SET manifest=? WHERE id=? AND has_manifest=1"),
          manifest(db, "SELECT path, type, mode, size, digest, target, mtime_ns, link_to, uid, gid, xattrs, xlink FROM entries WHERE package=? ORDER BY path"),
          manifest_stored(db, "SELECT e.path, e.type, e.mode, e.size, e.digest, e.target, e.mtime_ns, e.link_to, e.uid, e.gid, e.xattrs, "
                              "e.xlink, o.size, o.stored_size FROM entries e LEFT JOIN objects o ON o.digest = e.digest "
                              "WHERE e.package=? ORDER BY e.path"),
          add_object(db, "INSERT OR IGNORE INTO objects(digest, size, stored_size) VALUES (?,?,?)"),
          has_object(db, "SELECT 1 FROM objects WHERE digest=?"),
          objects(db, "SELECT digest, size, stored_size FROM objects"),
          del_object(db, "DELETE FROM objects WHERE digest=?"),
          unreferenced(db, "SELECT o.digest, o.size, o.stored_size FROM objects o WHERE o.digest NOT IN (SELECT digest FROM entries WHERE digest IS NOT NULL)"),
          totals(db, "SELECT (SELECT COALESCE(SUM(files),0) FROM packages WHERE has_manifest=1), "
                     "(SELECT COALESCE(SUM(bytes),0) FROM packages WHERE has_manifest=1), "
                     "(SELECT objects FROM object_totals), (SELECT stored FROM object_totals), "
                     "(SELECT bytes FROM object_totals)"),
          get_identity(db, "SELECT store_id, generation FROM store_identity WHERE one=1"),
          claim(db, "INSERT INTO store_identity(one, store_id, generation) VALUES (1, ?, ?)"),
          advance(db, "UPDATE store_identity SET generation=generation+1 WHERE one=1 RETURNING generation"),
          journal(db, "INSERT INTO journal(at_ns, who, command, package, from_state, to_state, detail) VALUES (?,?,?,?,?,?,?)"),
          journal_tail(db, "SELECT at_ns, who, command, COALESCE(package,''), COALESCE(from_state,''), COALESCE(to_state,''), COALESCE(detail,'') FROM journal ORDER BY id DESC LIMIT ?") {}
    Stmt get_mode, set_mode, packages, package, add_package, set_state, set_verify_failure, set_tree, del_package, del_entries, ins_entry,
        set_manifest, clear_manifest, set_manifest_object, manifest, manifest_stored, add_object, has_object, objects, del_object, unreferenced, totals,
        get_identity, claim, advance, journal, journal_tail;
};

std::vector<Catalog::JournalRow> Catalog::last_run(const std::string& command) {
    std::vector<JournalRow> out;
    Stmt who(m_db, "SELECT who FROM journal WHERE command = ? ORDER BY id DESC LIMIT 1");
    who.bind(1, command);
    if (!who.step()) return out;
    const std::string w = who.str(0);
    Stmt q(m_db, "SELECT at_ns, who, command, COALESCE(package,''), COALESCE(from_state,''), COALESCE(to_state,''), "
                 "COALESCE(detail,'') FROM journal WHERE command = ? AND who = ? ORDER BY id");
    q.bind(1, command).bind(2, w);
    while (q.step()) out.push_back({q.i64(0), q.str(1), q.str(2), q.str(3), q.str(4), q.str(5), q.str(6)});
    return out;
}

static std::string who_am_i() {
    std::string user = "uid" + std::to_string(::getuid());
    if (passwd* pw = ::getpwuid(::getuid())) user = pw->pw_name;
    char host[256] = "";
    ::gethostname(host, sizeof host - 1);
    return user + "@" + host + " pid " + std::to_string(::getpid());
}

Catalog::Catalog(const std::string& path, OpenMode mode) : m_db(path, mode), m_who(who_am_i()) {
    if (mode == OpenMode::read_write) migrate_schema(m_db);
    else if (auto v = user_version(m_db); v > schema_version())
        throw util::Error("catalog " + path + " has schema version " + std::to_string(v) +
                          ", newer than this casmig understands (" + std::to_string(schema_version()) +
                          "): upgrade casmig");
    else if (v != schema_version())
        throw util::Error("catalog " + path + " has schema version " + std::to_string(v) + ", expected " +
                          std::to_string(schema_version()) + ": run 'casmig migrate' to upgrade it");
    m_s = std::make_unique<Stmts>(m_db);
}

Catalog::~Catalog() = default;

StoreMode Catalog::mode() {
    auto& s = m_s->get_mode;
    StoreMode m = StoreMode::legacy;
    if (s.step()) m = store_mode_from(s.str(0));
    s.reset();
    return m;
}

void Catalog::set_mode(StoreMode m) { m_s->set_mode.bind(1, std::string_view(to_string(m))).run(); }

std::optional<Identity> Catalog::identity() {
    auto& s = m_s->get_identity;
    std::optional<Identity> r;
    if (s.step()) r = Identity{s.str(0), s.i64(1)};
    s.reset();
    return r;
}

void Catalog::claim(const Identity& id) {
    m_s->claim.bind(1, std::string_view(id.store_id)).bind(2, id.generation).run();
}

std::int64_t Catalog::advance_generation() {
    auto& s = m_s->advance;
    if (!s.step()) {
        s.reset();
        throw util::Error("catalog " + m_db.path() + " has no store identity to advance: " + k_recover_catalog);
    }
    std::int64_t g = s.i64(0);
    s.run(); // finishes the statement (RETURNING steps once per row) and resets it
    return g;
}

static Package read_package(Stmt& s, const std::string& db_path) {
    Package p;
    p.id = s.i64(0);
    p.name = s.str(1);
    // A name becomes a path under the store: one that is not a single component ("../victim") would
    // take cleanup, rollback or remove outside it.
    if (!is_path_component(p.name)) {
        s.reset();
        throw util::RefusedError("catalog " + db_path + " holds an invalid package name '" + util::printable(p.name) +
                                 "': the catalog is damaged; " + k_recover_catalog);
    }
    p.state = package_state_from(s.str(2));
    p.tree = tree_state_from(s.str(3));
    p.has_manifest = s.i64(4) != 0;
    p.files = s.i64(5);
    p.bytes = s.i64(6);
    p.error = s.str(7);
    if (s.is_null(8)) p.manifest_object.reset();
    else {
        std::string raw = s.str(8);
        if (raw.size() != 32) {
            s.reset();
            throw util::RefusedError("catalog " + db_path + " holds a damaged manifest digest for package '" +
                                     util::printable(p.name) + "': " + k_recover_catalog);
        }
        p.manifest_object = hash::Digest::from_raw(raw);
    }
    p.verify_error = s.str(9);
    p.verify_failed_at_ns = s.i64(10);
    return p;
}

std::vector<Package> Catalog::packages() {
    std::vector<Package> out;
    auto& s = m_s->packages;
    while (s.step()) out.push_back(read_package(s, m_db.path()));
    s.reset();
    return out;
}

std::optional<Package> Catalog::package(const std::string& name) {
    auto& s = m_s->package;
    s.bind_blob(1, name);
    std::optional<Package> p;
    if (s.step()) p = read_package(s, m_db.path());
    s.reset();
    return p;
}

std::int64_t Catalog::add_package(const std::string& name) {
    m_s->add_package.bind_blob(1, name).bind(2, now_ns()).run();
    return sqlite3_last_insert_rowid(m_db.handle());
}

void Catalog::set_state(std::int64_t id, PackageState s, const std::string& error) {
    auto& st = m_s->set_state;
    st.bind(1, std::string_view(to_string(s)));
    if (error.empty()) st.bind_null(2);
    else st.bind(2, std::string_view(error));
    st.bind(3, now_ns()).bind(4, id).run();
}

void Catalog::set_verify_failure(std::int64_t id, const std::string& error) {
    auto& st = m_s->set_verify_failure;
    if (error.empty()) st.bind_null(1).bind_null(2);
    else st.bind(1, std::string_view(error)).bind(2, now_ns());
    st.bind(3, id).run();
}

void Catalog::set_tree(std::int64_t id, TreeState t) {
    m_s->set_tree.bind(1, std::string_view(to_string(t))).bind(2, now_ns()).bind(3, id).run();
}

void Catalog::delete_package(std::int64_t id) {
    m_s->del_entries.bind(1, id).run();
    m_s->del_package.bind(1, id).run();
}

void Catalog::put_manifest(std::int64_t id, const std::vector<Entry>& entries, const std::optional<hash::Digest>& object) {
    m_s->del_entries.bind(1, id).run();
    std::int64_t files = 0, bytes = 0;
    auto& ins = m_s->ins_entry;
    for (const auto& e : entries) {
        ins.bind(1, id).bind_blob(2, e.path).bind(3, static_cast<std::int64_t>(e.type)).bind(4, e.mode)
            .bind(5, static_cast<std::int64_t>(e.size));
        if (e.digest) ins.bind_blob(6, e.digest->raw());
        else ins.bind_null(6);
        if (e.type == EntryType::symlink) ins.bind_blob(7, e.target);
        else ins.bind_null(7);
        ins.bind(8, e.mtime_ns);
        if (e.link_to) ins.bind_blob(9, *e.link_to);
        else ins.bind_null(9);
        ins.bind(10, static_cast<std::int64_t>(e.uid)).bind(11, static_cast<std::int64_t>(e.gid));
        if (e.xattrs.empty()) ins.bind_null(12);
        else ins.bind_blob(12, e.xattrs);
        if (e.xlink) ins.bind(13, *e.xlink);
        else ins.bind_null(13);
        ins.run();
        if (e.type == EntryType::file) {
            ++files;
            bytes += static_cast<std::int64_t>(e.size);
        }
    }
    auto& sm = m_s->set_manifest;
    sm.bind(1, files).bind(2, bytes);
    if (object) sm.bind_blob(3, object->raw());
    else sm.bind_null(3);
    sm.bind(4, now_ns()).bind(5, id).run();
}

void Catalog::set_manifest_object(std::int64_t id, const hash::Digest& object) {
    m_s->set_manifest_object.bind_blob(1, object.raw()).bind(2, id).run();
}

void Catalog::for_each_referenced_digest(const std::function<void(const hash::Digest&)>& f) {
    Stmt q(m_db, "SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL");
    while (q.step()) {
        std::string raw = q.str(0);
        if (raw.size() != 32)
            throw util::RefusedError("catalog " + m_db.path() + " holds a damaged object digest: " + k_recover_catalog);
        f(hash::Digest::from_raw(raw));
    }
}

std::vector<Package> Catalog::packages_needing(const hash::Digest& d) {
    Stmt q(m_db, "SELECT id, name, state, tree, has_manifest, files, bytes, COALESCE(error,''), manifest, COALESCE(verify_error,''), COALESCE(verify_failed_at,0) FROM packages "
                 "WHERE id IN (SELECT DISTINCT package FROM entries WHERE digest = ?) ORDER BY name");
    q.bind_blob(1, d.raw());
    std::vector<Package> out;
    while (q.step()) out.push_back(read_package(q, m_db.path()));
    return out;
}

void Catalog::clear_manifest(std::int64_t id) {
    m_s->del_entries.bind(1, id).run();
    m_s->clear_manifest.bind(1, id).run();
}

std::vector<Entry> Catalog::manifest(std::int64_t id, std::vector<std::int64_t>* stored) {
    std::vector<Entry> out;
    auto& s = stored ? m_s->manifest_stored : m_s->manifest;
    if (stored) stored->clear();
    s.bind(1, id);
    while (s.step()) {
        Entry e;
        e.path = s.str(0);
        e.type = static_cast<EntryType>(s.i64(1));
        e.mode = static_cast<std::uint32_t>(s.i64(2));
        e.size = static_cast<std::uint64_t>(s.i64(3));
        if (!s.is_null(4)) e.digest = hash::Digest::from_raw(s.str(4));
        if (!s.is_null(5)) e.target = s.str(5);
        e.mtime_ns = s.i64(6);
        e.link_to = s.opt_str(7);
        e.uid = static_cast<std::uint32_t>(s.i64(8));
        e.gid = static_cast<std::uint32_t>(s.i64(9));
        if (!s.is_null(10)) e.xattrs = s.str(10);
        if (!s.is_null(11)) e.xlink = s.i64(11);
        if (stored) // the object's row, if it has one and it is of this entry's size
            stored->push_back(!s.is_null(12) && e.type == EntryType::file && static_cast<std::uint64_t>(s.i64(12)) == e.size
                                  ? s.i64(13) : -1);
        out.push_back(std::move(e));
    }
    s.reset();
    return out;
}

std::optional<std::string> Catalog::setting(std::string_view key) {
    Stmt q(m_db, "SELECT value FROM settings WHERE key=?");
    q.bind(1, key);
    if (!q.step()) return std::nullopt;
    return q.str(0);
}

void Catalog::set_setting(std::string_view key, std::string_view value) {
    Stmt q(m_db, "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value");
    q.bind(1, key).bind(2, value).run();
}

void Catalog::delete_setting(std::string_view key) {
    Stmt q(m_db, "DELETE FROM settings WHERE key=?");
    q.bind(1, key).run();
}

void Catalog::set_stored_size(const hash::Digest& d, std::int64_t stored_size) {
    Stmt q(m_db, "UPDATE objects SET stored_size=? WHERE digest=?");
    q.bind(1, stored_size).bind_blob(2, d.raw()).run();
}

void Catalog::add_object(const ObjectRow& o) {
    m_s->add_object.bind_blob(1, o.digest.raw()).bind(2, o.size).bind(3, o.stored_size).run();
}

bool Catalog::has_object(const hash::Digest& d) {
    auto& s = m_s->has_object;
    s.bind_blob(1, d.raw());
    bool r = s.step();
    s.reset();
    return r;
}

bool Catalog::has_any_object() {
    Stmt q(m_db, "SELECT 1 FROM objects LIMIT 1");
    return q.step();
}

std::optional<std::string> Catalog::last_outcome(const std::string& command, const std::string& package) {
    Stmt q(m_db, "SELECT COALESCE(detail,'') FROM journal WHERE command=? AND package=? AND "
                 "COALESCE(detail,'') NOT LIKE 'intent:%' ORDER BY id DESC LIMIT 1");
    q.bind(1, command).bind(2, package);
    if (!q.step()) return std::nullopt;
    return q.str(0);
}

static std::vector<ObjectRow> read_objects(Stmt& s) {
    std::vector<ObjectRow> out;
    while (s.step()) out.push_back({hash::Digest::from_raw(s.str(0)), s.i64(1), s.i64(2)});
    s.reset();
    return out;
}

std::vector<ObjectRow> Catalog::objects() { return read_objects(m_s->objects); }
void Catalog::for_each_object(const std::function<void(const ObjectRow&)>& f) {
    auto& s = m_s->objects;
    struct Reset {
        Stmt& s;
        ~Reset() { s.reset(); }
    } reset{s};
    while (s.step()) f({hash::Digest::from_raw(s.str(0)), s.i64(1), s.i64(2)});
}

std::vector<ObjectRow> Catalog::unreferenced_objects() { return read_objects(m_s->unreferenced); }

void Catalog::delete_object(const hash::Digest& d) { m_s->del_object.bind_blob(1, d.raw()).run(); }

bool ReaderPool::has_object(const hash::Digest& d) {
    std::unique_ptr<Catalog> c;
    {
        std::lock_guard lk(m_mutex);
        if (!m_free.empty()) {
            c = std::move(m_free.back());
            m_free.pop_back();
        }
    }
    if (!c) {
        c = std::make_unique<Catalog>(m_path, OpenMode::read_only);
        // Point lookups on the objects index: its interior pages fit in a small cache, a leaf missed
        // comes from the OS page cache. The default 16 MiB per connection, one per ingest thread, would
        // grow the process by tens of MiB as the store grows (issue 9: peak RSS flat with store size).
        c->db().exec("PRAGMA cache_size=-" + std::to_string(k_reader_cache_kib));
    }
    bool found = c->has_object(d);
    std::lock_guard lk(m_mutex);
    m_free.push_back(std::move(c));
    return found;
}

Totals Catalog::totals() {
    auto& s = m_s->totals;
    Totals t;
    if (s.step()) {
        t.files = s.i64(0);
        t.logical_bytes = s.i64(1);
        t.objects = s.i64(2);
        t.stored_bytes = s.i64(3);
        t.object_bytes = s.i64(4);
    }
    s.reset();
    return t;
}

void Catalog::journal(const std::string& command, const std::string& package, const std::string& from,
                      const std::string& to, const std::string& detail) {
    auto& s = m_s->journal;
    s.bind(1, now_ns()).bind(2, std::string_view(m_who)).bind(3, std::string_view(command));
    auto opt = [&](int i, const std::string& v) {
        if (v.empty()) s.bind_null(i);
        else s.bind(i, std::string_view(v));
    };
    opt(4, package);
    opt(5, from);
    opt(6, to);
    opt(7, detail);
    s.run();
}

std::vector<Catalog::JournalRow> Catalog::journal_tail(int n) {
    std::vector<JournalRow> out;
    auto& s = m_s->journal_tail;
    s.bind(1, n);
    while (s.step()) out.push_back({s.i64(0), s.str(1), s.str(2), s.str(3), s.str(4), s.str(5), s.str(6)});
    s.reset();
    return out;
}

} // namespace casmig::catalog
