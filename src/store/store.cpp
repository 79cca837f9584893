#include "casmig/store/store.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"

#include <algorithm>
#include <cerrno>
#include <dirent.h>
#include <fcntl.h>
#include <set>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::store {

bool is_reserved(const std::string& name) {
    return name.empty() || name[0] == '.' || name == "objects" || name == "temp" || name == "migration" ||
           name == "packages";
}

StoreLock::StoreLock(const std::string& path, LockKind kind, const std::string& command) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) util::throw_errno("cannot open lock file", path);
    m_fd = util::Fd(fd);
    if (::flock(fd, (kind == LockKind::exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK) util::throw_errno("cannot lock", path);
        char buf[128] = "";
        ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
        std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
        while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
        throw util::BusyError("store is busy: " + path + " is held" + (holder.empty() ? "" : " by " + holder) +
                              "; wait for that run to finish (status works meanwhile), then retry " + command);
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

std::unique_ptr<StoreLock> Store::lock(const std::string& command) {
    util::ensure_dir(migration_dir());
    auto l = std::make_unique<StoreLock>(migration_dir() + "/lock", LockKind::exclusive, command);
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
    if (!m_catalog) m_catalog = std::make_unique<catalog::Catalog>(m_db_path, catalog::OpenMode::read_write);
    return *m_catalog;
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
        if (gone && p.tree == catalog::TreeState::present &&
            (p.state == catalog::PackageState::pending || p.state == catalog::PackageState::failed ||
             p.state == catalog::PackageState::rolled_back || p.state == catalog::PackageState::in_progress)) {
            cat.delete_package(p.id);
            cat.journal("discover", util::printable(p.name), catalog::to_string(p.state), "dropped",
                        "legacy directory vanished");
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

} // namespace casmig::store
