#include "casmig/util/fd.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"

#include <cerrno>
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <vector>

namespace casmig::util {

void Fd::reset() noexcept {
    if (m_fd >= 0) {
        ::close(m_fd);
        m_fd = -1;
    }
}

Fd open_dir_at(int dirfd, const std::string& name, const std::string& display) {
    int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open directory", display);
    return Fd(fd);
}

Fd open_dir(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open directory", path);
    return Fd(fd);
}

void fsync_fd(int fd, const std::string& display) {
    if (io::fsync(fd) != 0) throw_errno("fsync failed", display);
}

void write_all(int fd, const void* buf, size_t len, const std::string& display) {
    auto p = static_cast<const char*>(buf);
    while (len > 0) {
        ssize_t n = io::write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw_errno("write failed", display);
        }
        p += n;
        len -= static_cast<size_t>(n);
    }
}

bool lstat_at(int dirfd, const std::string& name, struct stat& st, const std::string& display) {
    if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) return true;
    if (errno == ENOENT) return false;
    throw_errno("cannot stat", display);
}

std::string read_link_at(int dirfd, const std::string& name, const std::string& display) {
    std::string buf(256, '\0');
    for (;;) {
        ssize_t n = ::readlinkat(dirfd, name.c_str(), buf.data(), buf.size());
        if (n < 0) throw_errno("cannot read symlink", display);
        if (static_cast<size_t>(n) < buf.size()) {
            buf.resize(static_cast<size_t>(n));
            return buf;
        }
        buf.resize(buf.size() * 2);
    }
}

Fd open_beneath(int dirfd, const std::string& path, const std::string& display) {
    Fd cur(::dup(dirfd));
    if (!cur) throw_errno("cannot open", display);
    size_t pos = 0;
    for (;;) {
        size_t slash = path.find('/', pos);
        std::string comp = path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
        if (comp.empty() || comp == "." || comp == "..") throw Error("refusing path " + display + ": not a plain relative path");
        if (slash == std::string::npos) {
            int fd = ::openat(cur.get(), comp.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
            if (fd < 0) throw_errno("cannot open", display);
            return Fd(fd);
        }
        int fd = ::openat(cur.get(), comp.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) throw_errno("cannot open directory", display);
        cur = Fd(fd);
        pos = slash + 1;
    }
}

std::vector<std::string> list_dir(int fd, const std::string& display) {
    int dfd = ::dup(fd);
    DIR* d = dfd >= 0 ? ::fdopendir(dfd) : nullptr;
    if (!d) {
        if (dfd >= 0) ::close(dfd);
        throw_errno("cannot read directory", display);
    }
    ::rewinddir(d); // the dup shares the offset of fd, which an earlier listing left at the end
    std::vector<std::string> names;
    errno = 0;
    while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(std::move(n));
        errno = 0;
    }
    int err = errno;
    ::closedir(d);
    if (err) {
        errno = err;
        throw_errno("cannot read directory", display);
    }
    return names;
}

namespace {

void count_file(const struct stat& st, FreedBytes& freed) {
    if (!S_ISREG(st.st_mode)) return;
    freed.apparent += static_cast<unsigned long long>(st.st_size);
    // Seen just before the unlink: the last name, so its blocks go back to the filesystem.
    if (st.st_nlink <= 1) freed.allocated += static_cast<unsigned long long>(st.st_blocks) * 512;
}

void remove_tree(int dirfd, const std::string& name, const std::string& display, FreedBytes& freed);

void remove_children(int fd, const std::string& display, FreedBytes& freed) {
    std::vector<std::string> names = list_dir(fd, display);
    for (const auto& n : names) {
        struct stat st {};
        if (!lstat_at(fd, n, st, display + "/" + printable(n))) continue;
        if (S_ISDIR(st.st_mode)) {
            remove_tree(fd, n, display + "/" + printable(n), freed);
        } else {
            if (io::unlinkat(fd, n.c_str(), 0) != 0 && errno != ENOENT)
                throw_errno("cannot remove", display + "/" + printable(n));
            count_file(st, freed);
        }
    }
}

void remove_tree(int dirfd, const std::string& name, const std::string& display, FreedBytes& freed) {
    struct stat st {};
    if (!lstat_at(dirfd, name, st, display)) return;
    if (!S_ISDIR(st.st_mode)) {
        if (io::unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT) throw_errno("cannot remove", display);
        count_file(st, freed);
        return;
    }
    // A read-only directory (mode 0555) cannot have its entries removed until it is writable.
    if ((st.st_mode & 0700) != 0700) ::fchmodat(dirfd, name.c_str(), (st.st_mode & 07777) | 0700, 0);
    {
        Fd fd = open_dir_at(dirfd, name, display);
        remove_children(fd.get(), display, freed);
    }
    if (io::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
        throw_errno("cannot remove directory", display);
}

} // namespace

unsigned long long remove_tree_at(int dirfd, const std::string& name, const std::string& display, FreedBytes* freed) {
    FreedBytes mine;
    remove_tree(dirfd, name, display, mine);
    if (freed) {
        freed->apparent += mine.apparent;
        freed->allocated += mine.allocated;
    }
    return mine.apparent;
}

void ensure_dir(const std::string& path, mode_t mode) {
    if (io::mkdirat(AT_FDCWD, path.c_str(), mode) != 0 && errno != EEXIST) throw_errno("cannot create directory", path);
}

void raise_fd_limit() {
    struct rlimit rl {};
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &rl); // best effort: a lower limit only shrinks read-ahead
    }
}


} // namespace casmig::util
