#include "casmig/store/store.hpp"
#include "casmig/store/packages.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <fcntl.h>
#include <set>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace casmig::store {

bool is_reserved(const std::string& name) {
    return name.empty() || name[0] == '.' || name == "objects" || name == "temp" || name == "migration" ||
           name == "packages";
}

bool is_package_name(std::string_view name) {
    return catalog::is_path_component(name) && !is_reserved(std::string(name));
}

namespace {

/// Who holds the lock on fd, as its exclusive holder wrote it ("casmig migrate pid 123"); "" when
/// unknown. Only an exclusive holder writes: what a shared holder (materialize on gc.lock) finds is
/// an earlier holder's, so a pid that is no longer running names nobody.
std::string lock_holder(int fd) {
    char buf[128] = "";
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    if (auto at = holder.rfind(" pid "); at != std::string::npos) {
        long pid = std::strtol(holder.c_str() + at + 5, nullptr, 10);
        if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return {};
    }
    return holder;
}

/// "3s", "1.5s", "250ms", "2m", "1h30m": how a wait reads in a message.
std::string wait_text(std::chrono::milliseconds d) {
    auto ms = d.count();
    if (ms < 1000) return std::to_string(ms) + "ms";
    if (ms % 1000) {
        char b[32];
        std::snprintf(b, sizeof b, "%.1fs", static_cast<double>(ms) / 1000.0);
        return b;
    }
    auto s = ms / 1000;
    std::string out;
    if (s >= 3600) out += std::to_string(s / 3600) + "h";
    if (s % 3600 >= 60) out += std::to_string(s % 3600 / 60) + "m";
    if (s % 60 || out.empty()) out += std::to_string(s % 60) + "s";
    return out;
}

} // namespace

StoreLock::StoreLock(const std::string& path, LockKind kind, const std::string& command, const LockWait& wait) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) util::throw_errno("cannot open lock file", path);
    m_fd = util::Fd(fd);
    // Polled, not a blocking flock(): a blocked flock can only be ended by a signal (which the library
    // must not use) or by leaving a thread behind that would take the lock later; 50 ms between tries
    // costs nothing and lets a stop request end the wait.
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + wait.max;
    bool waiting = false;
    for (;;) {
        if (::flock(fd, (kind == LockKind::exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0) break;
        if (errno == EINTR) continue;
        if (errno != EWOULDBLOCK) util::throw_errno("cannot lock", path);
        const std::string holder = lock_holder(fd);
        const std::string by = holder.empty() ? "" : " by " + holder;
        const auto now = Clock::now();
        if (now >= deadline)
            throw util::BusyError("store is busy: " + path + " is held" + by +
                                  (waiting ? " (waited " + wait_text(wait.max) + " for it)" : "") +
                                  "; wait for that run to finish (status works meanwhile), then retry " + command +
                                  (waiting ? ", or wait longer (--lock-wait DUR)" : " (--lock-wait DUR waits for it)"));
        if (int sig = util::stop_signal())
            throw util::InterruptedError("interrupted (" + util::signal_name(sig) + ") while waiting for " + path +
                                             " (held" + by + "): nothing was done; run " + command + " again",
                                         sig);
        if (!waiting) {
            waiting = true;
            if (wait.waiting) wait.waiting("waiting up to " + wait_text(wait.max) + " for " + path + ", held" + by);
        }
        std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(50), deadline - now));
    }
    if (kind == LockKind::exclusive) {
        // Best effort: the holder's pid and command, for the message a second writer prints.
        std::string me = "casmig " + command + " pid " + std::to_string(::getpid()) + "\n";
        if (::ftruncate(fd, 0) == 0) ::pwrite(fd, me.data(), me.size(), 0);
    }
}

Store::Store(std::string root, std::string db_path) : m_root(std::move(root)) {
    while (m_root.size() > 1 && m_root.back() == '/') m_root.pop_back();
    struct stat st {};
    if (::stat(m_root.c_str(), &st) != 0) {
        if (errno == EACCES)
            throw util::UsageError("store " + m_root + " is not accessible: permission denied; run casmig as the store's owner");
        throw util::UsageError("store " + m_root + " does not exist: pass --store DIR or set CASMIG_STORE");
    }
    if (!S_ISDIR(st.st_mode))
        throw util::UsageError("store " + m_root + " is not a directory: pass --store DIR or set CASMIG_STORE");
    int fd = ::open(m_root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) util::throw_errno("cannot open store", m_root);
    m_root_fd = util::Fd(fd);
    m_db_path = db_path.empty() ? m_root + "/store.db" : db_path;
}

bool Store::has_catalog() const { return ::access(m_db_path.c_str(), F_OK) == 0; }

void Store::ensure_layout() {
    util::ensure_dir(objects_dir());
    util::ensure_dir(temp_dir(), 0700);
    util::ensure_dir(migration_dir());
    util::ensure_dir(m_root + "/packages");
    static const char* hex = "0123456789abcdef";
    std::string base = objects_dir() + "/";
    bool created = false;
    for (int i = 0; i < 256; ++i) {
        std::string p = base + hex[i >> 4] + hex[i & 15];
        if (io::mkdirat(AT_FDCWD, p.c_str(), 0755) == 0) created = true;
        else if (errno != EEXIST) util::throw_errno("cannot create directory", p);
    }
    if (created) {
        util::Fd o = util::open_dir(objects_dir());
        util::fsync_fd(o.get(), objects_dir());
        util::fsync_fd(m_root_fd.get(), m_root);
    }
}

std::unique_ptr<StoreLock> Store::lock(const std::string& command, Purpose purpose) {
    util::ensure_dir(migration_dir());
    auto l = std::make_unique<StoreLock>(migration_dir() + "/lock", LockKind::exclusive, command, m_lock_wait);
    check_catalog(purpose, command);
    // temp/ is casmig's alone: a symlink there (or a file) is refused before anything is created or
    // removed, and its target is never touched.
    struct stat st {};
    if (::fstatat(m_root_fd.get(), "temp", &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(st.st_mode))
        throw util::RefusedError(temp_dir() + " is " + (S_ISLNK(st.st_mode) ? "a symlink" : "not a directory") +
                                 ": casmig stages files there and removes what it left; move it out of the way (mv " +
                                 temp_dir() + " " + temp_dir() + ".old) and rerun " + command);
    ensure_layout();
    // Staging directories of dead casmig processes go (a live one's lock keeps its files, e.g. a running
    // materialize's); trash-* and rollback-* are the lifecycle's; anything else is named, never removed.
    auto sweep = objects().sweep_temp();
    if (!sweep.foreign.empty() && m_warn) {
        std::string names;
        for (size_t i = 0; i < sweep.foreign.size() && i < 5; ++i) names += (i ? ", " : "") + util::printable(sweep.foreign[i]);
        if (sweep.foreign.size() > 5) names += ", and " + std::to_string(sweep.foreign.size() - 5) + " more";
        m_warn(temp_dir() + " holds " + std::to_string(sweep.foreign.size()) +
               " entr" + (sweep.foreign.size() == 1 ? "y" : "ies") + " casmig did not make (" + names +
               "); left alone: move them out of " + temp_dir());
    }
    return l;
}

catalog::Catalog& Store::catalog() {
    // Never opened (or created) unchecked: a caller that skipped lock() gets the write checks here.
    if (!m_checked) check_catalog(Purpose::write, "casmig");
    if (!m_catalog) m_catalog = std::make_unique<catalog::Catalog>(m_db_path, catalog::OpenMode::read_write);
    return *m_catalog;
}

// ------------------------------------------------------------------ identity

namespace {

const char* const k_marker = "identity";
const char* const k_marker_new = "identity.new";
const char* const k_marker_magic = "casmig-store-identity 1";

bool dir_has_entry(int dirfd, const char* name, bool descend, const std::string& display) {
    int fd = ::openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return false;
        if (errno == ENOTDIR || errno == ELOOP) return true; // something casmig did not make: not new
        util::throw_errno("cannot examine", display);
    }
    util::Fd d(fd);
    for (const auto& n : util::list_dir(d.get(), display)) {
        if (!descend) return true;
        struct stat st {};
        if (::fstatat(d.get(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) return true;
        if (dir_has_entry(d.get(), n.c_str(), false, display + "/" + n)) return true;
    }
    return false;
}


bool is_store_id(const std::string& s) {
    return s.size() == 32 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

} // namespace

bool Store::holds_data() const {
    return dir_has_entry(m_root_fd.get(), "objects", true, objects_dir()) ||
           dir_has_entry(m_root_fd.get(), "packages", true, m_root + "/packages");
}

std::optional<catalog::Identity> Store::read_marker() const {
    std::string path = migration_dir() + "/" + k_marker;
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return std::nullopt;
        if (errno != ELOOP) util::throw_errno("cannot read the store identity marker", path);
    }
    util::Fd f(fd);
    char buf[512];
    ssize_t n = fd < 0 ? -1 : ::read(fd, buf, sizeof buf);
    // "casmig-store-identity 1\nstore_id <hex>\ngeneration <n>\n", nothing else.
    std::string text = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
    catalog::Identity id;
    bool ok = false;
    std::string want = std::string(k_marker_magic) + "\nstore_id ";
    if (text.size() < sizeof buf && text.rfind(want, 0) == 0) {
        size_t p = want.size(), nl = text.find('\n', p);
        if (nl != std::string::npos) {
            id.store_id = text.substr(p, nl - p);
            std::string g = "generation ";
            if (text.compare(nl + 1, g.size(), g) == 0) {
                const char* b = text.data() + nl + 1 + g.size();
                const char* e = text.data() + text.size();
                auto [end, ec] = std::from_chars(b, e, id.generation);
                ok = ec == std::errc() && end != b && end + 1 == e && *end == '\n' && id.generation >= 0 &&
                     is_store_id(id.store_id);
            }
        }
    }
    if (!ok)
        throw util::RefusedError("store identity marker " + path + " is damaged (expected '" + k_marker_magic +
                                 "', store_id, generation lines): restore it from a backup of the store, or run "
                                 "casmig rebuild-catalog; the store is unchanged");
    return id;
}

void Store::write_marker(const catalog::Identity& id) {
    std::string dir_path = migration_dir();
    util::Fd dir = util::open_dir(dir_path);
    std::string text = std::string(k_marker_magic) + "\nstore_id " + id.store_id + "\ngeneration " +
                       std::to_string(id.generation) + "\n";
    std::string tmp = dir_path + "/" + k_marker_new;
    {
        int fd = io::openat_create(dir.get(), k_marker_new, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0) util::throw_errno("cannot write the store identity marker", tmp);
        util::Fd f(fd);
        util::write_all(f.get(), text.data(), text.size(), tmp);
        util::fsync_fd(f.get(), tmp);
    }
    io::crash_point("identity.staged");
    if (io::renameat2(dir.get(), k_marker_new, dir.get(), k_marker, 0) != 0)
        util::throw_errno("cannot put the store identity marker in place", dir_path + "/" + k_marker);
    io::crash_point("identity.renamed");
    util::fsync_fd(dir.get(), dir_path);
}

void Store::judge(const catalog::Inspection& c, const std::optional<catalog::Identity>& marker, bool data) const {
    using Kind = catalog::Inspection::Kind;
    std::string db = "catalog " + m_db_path + (m_db_path == m_root + "/store.db" ? "" : " (check --db)");
    std::string store = "store " + m_root;
    std::string holds = data ? " holds objects" : " has an identity marker (migration/identity)";
    auto refuse = [&](const std::string& what) {
        throw util::RefusedError(what + "; " + catalog::k_recover_catalog + "; the store is unchanged");
    };
    auto gen = [](std::int64_t g) { return "generation " + std::to_string(g); };
    switch (c.kind) {
    case Kind::unreadable: refuse(db + " cannot be read (" + c.problem + ")"); return;
    case Kind::missing:
        if (data || marker) refuse(db + " does not exist, but " + store + holds + ": it is not a new store");
        return;
    case Kind::empty:
        if (data || marker) refuse(db + " is empty, but " + store + holds + ": it is not a new store");
        return;
    case Kind::unclaimed:
        if (marker)
            refuse(db + " has no store identity, but " + store + " is " + marker->store_id +
                   ": it is not this store's catalog (or a backup from before identities)");
        if (data && !c.has_rows) refuse(db + " is empty, but " + store + holds + ": it is not a new store");
        break;
    case Kind::claimed: {
        const auto& id = *c.identity;
        if (!marker) {
            // A claimed catalog without a marker is safe to re-mark only while the store holds nothing
            // a stale catalog could lead casmig to delete (a crash between claiming and marking a new store).
            if (data)
                throw util::RefusedError(store + " has lost its identity marker (migration/identity) while " + db +
                                         " names store " + id.store_id + " at " + gen(id.generation) +
                                         ": restore migration/identity from a backup of the store, or run casmig "
                                         "rebuild-catalog; the store is unchanged");
            break;
        }
        if (id.store_id != marker->store_id)
            refuse(db + " belongs to another store (" + id.store_id + "), not to " + store + " (" + marker->store_id + ")");
        if (id.generation < marker->generation)
            refuse(db + " is older than " + store + " (" + gen(id.generation) + ", the store is at " +
                   std::to_string(marker->generation) + "): it is a stale backup");
        if (id.generation > marker->generation + 1)
            refuse(store + "'s identity marker (" + gen(marker->generation) + ") is behind " + db + " (" +
                   gen(id.generation) + "): the marker was restored from an older backup");
        break;
    }
    }
    if (!c.integrity.empty()) refuse(db + " is damaged (integrity check: " + c.integrity + ")");
    if (c.bad_name)
        refuse(db + " holds an invalid package name '" + util::printable(*c.bad_name) + "': the catalog is damaged");
}

std::optional<std::string> Store::catalog_misfit() const {
    try {
        judge(catalog::inspect(m_db_path, catalog::IntegrityCheck::yes, is_package_name), read_marker(), holds_data());
    } catch (const util::RefusedError& e) {
        return std::string(e.what());
    }
    return std::nullopt;
}

void Store::check_catalog(Purpose purpose, const std::string& command) {
    if (purpose == Purpose::rebuild) return;
    auto check = purpose == Purpose::dry_run || purpose == Purpose::destroy ? catalog::IntegrityCheck::yes
                                                                            : catalog::IntegrityCheck::no;
    auto inspect = [&] {
        // The marker first: a destructive command running meanwhile (status takes no lock) moves the
        // catalog before the marker, so marker-then-catalog sees equal or catalog = marker + 1.
        auto marker = read_marker();
        judge(catalog::inspect(m_db_path, check, is_package_name), marker, holds_data());
    };
    if (purpose == Purpose::read) {
        try {
            inspect();
        } catch (const util::RefusedError&) {
            inspect(); // once more: two destructive commands may have finished between the two reads
        }
        return;
    }
    inspect();
    // Lock held: nothing moves the catalog or the marker but this process from here on.
    if (!m_catalog) m_catalog = std::make_unique<catalog::Catalog>(m_db_path, catalog::OpenMode::read_write);
    auto& cat = *m_catalog;
    auto marker = read_marker();
    auto id = cat.identity();
    if (!id) {
        bool adopted = cat.packages().size() > 0;
        catalog::Identity fresh{new_store_id(), 0};
        catalog::Transaction tx(cat.db());
        cat.claim(fresh);
        cat.journal(command, "", "", "", std::string(adopted ? "catalog from before store identities adopted" : "new store") +
                                             ": identity " + fresh.store_id);
        tx.commit();
        io::crash_point("identity.created");
        id = fresh;
    }
    if (!marker || marker->generation != id->generation) write_marker(*id);
    if (purpose == Purpose::destroy) {
        catalog::Transaction tx(cat.db());
        id->generation = cat.advance_generation();
        tx.commit();
        io::crash_point("generation.committed");
        write_marker(*id);
    }
    m_checked = true;
}

Store::~Store() = default;

PackageIndex& Store::packages() {
    if (!m_packages) m_packages = std::make_unique<PackageIndex>(*this);
    return *m_packages;
}

cas::ObjectStore& Store::objects() {
    if (!m_objects) m_objects = std::make_unique<cas::ObjectStore>(objects_dir(), temp_dir());
    return *m_objects;
}

std::vector<std::string> Store::legacy_dirs() const {
    std::vector<std::string> out;
    for (auto& n : util::list_dir(m_root_fd.get(), m_root)) {
        if (is_reserved(n)) continue;
        struct stat st {};
        if (::fstatat(m_root_fd.get(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
            out.push_back(std::move(n));
    }
    std::sort(out.begin(), out.end());
    return out;
}

int Store::discover() {
    auto dirs = legacy_dirs();
    std::set<std::string> present(dirs.begin(), dirs.end());
    auto& cat = catalog();
    catalog::Transaction tx(cat.db());
    int added = 0;
    std::set<std::string> known;
    for (const auto& p : cat.packages()) {
        known.insert(p.name);
        bool gone = !present.count(p.name);
        if (!gone || p.tree == catalog::TreeState::removed) continue;
        if (!p.has_manifest) {
            // Nothing of it is in the store: the package manager removed it before it was migrated.
            cat.delete_package(p.id);
            cat.journal("discover", util::printable(p.name), catalog::to_string(p.state), "dropped",
                        "legacy directory vanished");
        } else {
            // Never drop what has a manifest: its content may now exist only in the CAS (a tree a stopped
            // command moved aside, an admin's mistake). Record the tree as gone; rollback rebuilds it,
            // `casmig remove` drops it on purpose.
            cat.set_tree(p.id, catalog::TreeState::removed);
            cat.journal("discover", util::printable(p.name), catalog::to_string(p.tree), "removed",
                        "legacy directory vanished; manifest kept (casmig rollback rebuilds it, casmig remove drops it)");
        }
    }
    for (const auto& d : dirs) {
        if (known.count(d)) continue;
        cat.add_package(d);
        ++added;
    }
    if (added) cat.journal("discover", "", "", "pending", std::to_string(added) + " new legacy package(s)");
    tx.commit();
    return added;
}

std::optional<cas::Compression> read_compression(catalog::Catalog& cat) {
    auto v = cat.setting("compression");
    if (!v) return std::nullopt;
    return cas::Compression::parse(*v);
}

void write_compression(catalog::Catalog& cat, const cas::Compression& c) { cat.set_setting("compression", c.setting()); }

void clear_compression(catalog::Catalog& cat) { cat.delete_setting("compression"); }

std::string new_store_id() {
    unsigned char b[16];
    size_t got = 0;
    while (got < sizeof b) {
        ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            util::throw_errno("cannot draw a random store identity", "getrandom");
        }
        got += static_cast<size_t>(n);
    }
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned char c : b) {
        out += hex[c >> 4];
        out += hex[c & 15];
    }
    return out;
}

} // namespace casmig::store
