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
    push_dir(std::move(sfd), "");
}

void PackageWalker::push_dir(std::shared_ptr<util::Fd> fd, std::string prefix) {
    Frame f;
    try {
        f.names = util::list_dir(fd->get(), prefix);
    } catch (const util::SystemError& e) {
        throw PackageError(prefix, "cannot read directory: " + errno_text(e.code()));
    }
    std::sort(f.names.begin(), f.names.end());
    f.fd = std::move(fd);
    f.prefix = std::move(prefix);
    m_stack.push_back(std::move(f));
}

bool PackageWalker::next(Item& out) {
    if (m_root_pending) {
        m_root_pending = false;
        out = Item{};
        out.entry.path = "";
        out.entry.type = catalog::EntryType::dir;
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
            m_stack.pop_back();
            continue;
        }
        const std::string name = f.names[f.pos++];
        std::string path = join(f.prefix, name);
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
            out.entry.type = catalog::EntryType::dir;
            int fd = ::openat(f.fd->get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0) {
                int e = errno;
                throw PackageError(path, "cannot open directory: " + errno_text(e) +
                                             (e == EACCES ? " (make it readable or run casmig as its owner)" : ""));
            }
            try {
                out.entry.xattrs = util::read_xattrs(fd, path);
            } catch (const util::SystemError& e) {
                ::close(fd);
                throw PackageError(path, std::string("cannot read extended attributes: ") + errno_text(e.code()));
            }
            push_dir(std::make_shared<util::Fd>(fd), path); // invalidates f
            return true;
        }
        if (S_ISLNK(st.st_mode)) {
            out.entry.type = catalog::EntryType::symlink;
            try {
                out.entry.target = util::read_link_at(f.fd->get(), name, path);
            } catch (const util::SystemError& e) {
                throw PackageError(path, "cannot read symlink: " + errno_text(e.code()));
            }
            out.entry.size = out.entry.target.size();
            return true;
        }
        if (S_ISREG(st.st_mode)) {
            out.entry.type = catalog::EntryType::file;
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
