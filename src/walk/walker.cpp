#include "casmig/walk/walker.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include "casmig/util/xattr.hpp"

namespace casmig::walk {

std::string unsupported_type(mode_t mode) {
    if (S_ISFIFO(mode)) return "a fifo";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISREG(mode) || S_ISDIR(mode) || S_ISLNK(mode)) return {};
    return "a file of unknown type";
}

static std::int64_t mtime_ns(const struct stat& st) {
    return static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
}

static std::string errno_text(int e) { return std::strerror(e); }

PackageWalker::PackageWalker(int store_fd, const std::string& package) {
    int fd = ::openat(store_fd, package.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        throw PackageError("", "cannot open the package directory: " + errno_text(errno) +
                                   (errno == EACCES ? " (run casmig as the store's owner)" : ""));
    auto sfd = std::make_shared<util::Fd>(fd);
    if (::fstat(fd, &m_root_st) != 0) throw PackageError("", "cannot stat the package directory: " + errno_text(errno));
    try {
        m_root_xattrs = util::read_xattrs(fd, package);
    } catch (const util::SystemError& e) {
        throw PackageError("", std::string("cannot read extended attributes: ") + errno_text(e.code()));
    }
    push_dir(std::move(sfd), m_root_st);
}

// m_path must already name the directory being pushed.
void PackageWalker::push_dir(std::shared_ptr<util::Fd> fd, const struct stat& st) {
    Frame f;
    try {
        f.names = util::list_dir(fd->get(), m_path);
    } catch (const util::SystemError& e) {
        std::string shown = m_path;
        if (!m_stack.empty()) m_path.resize(m_stack.back().path_len); // the walk goes on in the parent
        throw PackageError(shown, "cannot read directory: " + errno_text(e.code()));
    }
    std::sort(f.names.begin(), f.names.end());
    f.fd = std::move(fd);
    f.path_len = m_path.size();
    f.dev = st.st_dev;
    f.ino = st.st_ino;
    m_stack.push_back(std::move(f));
    // Keep the root (the anchor reopen() falls back to) and the k_open_dirs - 1 innermost levels open.
    if (m_stack.size() > k_open_dirs) m_stack[m_stack.size() - k_open_dirs].fd.reset();
}

static constexpr int k_dir_flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;

static bool same_dir(int fd, dev_t dev, ino_t ino) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
}

util::Fd PackageWalker::reopen(size_t index) {
    const Frame& f = m_stack[index];
    const std::string path = m_path.substr(0, f.path_len);
    // Usually the child's "..": one openat, never a symlink, O(1) whatever the depth.
    util::Fd up(::openat(m_stack[index + 1].fd->get(), "..", k_dir_flags));
    if (up && same_dir(up.get(), f.dev, f.ino)) return up;
    // ".." needs search permission on the child, and a child moved elsewhere has another parent: walk
    // down again from the nearest open ancestor (the root at worst), by name, checking each level.
    size_t from = index;
    while (!m_stack[from].fd) --from;
    util::Fd cur;
    int at = m_stack[from].fd->get();
    for (size_t k = from + 1; k <= index; ++k) {
        const size_t start = m_stack[k - 1].path_len == 0 ? 0 : m_stack[k - 1].path_len + 1;
        const std::string name = m_path.substr(start, m_stack[k].path_len - start);
        util::Fd next(::openat(at, name.c_str(), k_dir_flags));
        if (!next && errno != ENOENT && errno != ENOTDIR && errno != ELOOP)
            throw PackageError(path, "cannot reopen directory: " + errno_text(errno));
        if (!next || !same_dir(next.get(), m_stack[k].dev, m_stack[k].ino))
            throw PackageError(path, "was moved or replaced while the package was being walked (the package is "
                                     "changing; rerun migrate when it is not being modified)");
        cur = std::move(next);
        at = cur.get();
    }
    return cur;
}

void PackageWalker::pop_dir() {
    const size_t n = m_stack.size();
    if (n >= 2 && !m_stack[n - 2].fd) {
        try {
            m_stack[n - 2].fd = std::make_shared<util::Fd>(reopen(n - 2));
        } catch (const PackageError&) {
            // The rest of the walk has nothing to stand on: end it, so that a caller that reports
            // the error and calls next() again is told the walk is over.
            m_stack.clear();
            m_path.clear();
            throw;
        }
    }
    m_stack.pop_back();
    m_path.resize(m_stack.empty() ? 0 : m_stack.back().path_len);
}

bool PackageWalker::next(Item& out) {
    if (m_root_pending) {
        m_root_pending = false;
        out = Item{};
        out.entry.path = "";
        out.entry.type = manifest::EntryType::dir;
        out.entry.mode = m_root_st.st_mode & 07777;
        out.entry.mtime_ns = mtime_ns(m_root_st);
        out.entry.xattrs = m_root_xattrs;
        out.entry.uid = m_root_st.st_uid;
        out.entry.gid = m_root_st.st_gid;
        out.st = m_root_st;
        return true;
    }
    while (!m_stack.empty()) {
        Frame& f = m_stack.back();
        if (f.pos == f.names.size()) {
            pop_dir();
            continue;
        }
        const std::string name = std::move(f.names[f.pos++]);
        std::string path = join(m_path, name);
        out = Item{};
        if (::fstatat(f.fd->get(), name.c_str(), &out.st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT)
                throw PackageError(path, "vanished while the package was being walked (the package is changing; "
                                         "rerun migrate when it is not being modified)");
            throw PackageError(path, "cannot stat: " + errno_text(errno));
        }
        const struct stat& st = out.st;
        out.entry.path = path;
        out.entry.mode = st.st_mode & 07777;
        out.entry.mtime_ns = mtime_ns(st);
        out.entry.uid = st.st_uid;
        out.entry.gid = st.st_gid;
        if (S_ISDIR(st.st_mode)) {
            out.entry.type = manifest::EntryType::dir;
            util::Fd fd(::openat(f.fd->get(), name.c_str(), k_dir_flags));
            if (!fd) {
                int e = errno;
                throw PackageError(path, "cannot open directory: " + errno_text(e) +
                                             (e == EACCES ? " (make it readable or run casmig as its owner)" : ""));
            }
            // The directory opened must be the one lstat'ed: its identity is what reopen() checks later.
            if (!same_dir(fd.get(), st.st_dev, st.st_ino))
                throw PackageError(path, "was replaced while the package was being walked (the package is changing; "
                                         "rerun migrate when it is not being modified)");
            try {
                out.entry.xattrs = util::read_xattrs(fd.get(), path);
            } catch (const util::SystemError& e) {
                throw PackageError(path, std::string("cannot read extended attributes: ") + errno_text(e.code()));
            }
            m_path = std::move(path);
            push_dir(std::make_shared<util::Fd>(std::move(fd)), st); // invalidates f
            return true;
        }
        if (S_ISLNK(st.st_mode)) {
            out.entry.type = manifest::EntryType::symlink;
            try {
                out.entry.target = util::read_link_at(f.fd->get(), name, path);
            } catch (const util::SystemError& e) {
                throw PackageError(path, "cannot read symlink: " + errno_text(e.code()));
            }
            out.entry.size = out.entry.target.size();
            return true;
        }
        if (S_ISREG(st.st_mode)) {
            out.entry.type = manifest::EntryType::file;
            out.entry.size = static_cast<std::uint64_t>(st.st_size);
            out.parent = f.fd;
            out.name = name;
            if (st.st_nlink > 1) {
                auto [it, fresh] = m_links.emplace(std::make_pair(st.st_dev, st.st_ino), path);
                if (!fresh) out.entry.link_to = it->second;
            }
            return true;
        }
        throw PackageError(path, "is " + unsupported_type(st.st_mode) +
                                     "; only regular files, directories and symlinks can be migrated: remove it "
                                     "from the package, then run migrate --retry-failed");
    }
    return false;
}

} // namespace casmig::walk
