// casmig::util — an owned file descriptor, and small helpers around *at() system calls.
#pragma once
#include <string>

#include "casmig/util/error.hpp"
#include <string_view>
#include <sys/stat.h>
#include <utility>
#include <vector>

namespace casmig::util {

/// Move-only owner of a file descriptor; closes it in the destructor (errors there are ignored on
/// purpose: a close() failure on a read-only or already-synced fd has nothing left to report).
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : m_fd(fd) {}
    Fd(Fd&& o) noexcept : m_fd(std::exchange(o.m_fd, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            m_fd = std::exchange(o.m_fd, -1);
        }
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const noexcept { return m_fd; }
    explicit operator bool() const noexcept { return m_fd >= 0; }
    int release() noexcept { return std::exchange(m_fd, -1); }
    void reset() noexcept;

private:
    int m_fd = -1;
};

enum class MustExist { no, yes };

/// Opens a directory relative to dirfd without following a symlink in the last component.
/// Throws SystemError naming `display` on failure.
Fd open_dir_at(int dirfd, const std::string& name, const std::string& display);
/// Opens a directory by absolute or relative path (follows symlinks: for the store root only).
Fd open_dir(const std::string& path);
/// fsync(fd); throws SystemError naming `display`.
void fsync_fd(int fd, const std::string& display);
/// Writes all of buf; throws on a short write.
void write_all(int fd, const void* buf, size_t len, const std::string& display);
/// lstat relative to dirfd; returns false if it does not exist (ENOENT), throws otherwise.
bool lstat_at(int dirfd, const std::string& name, struct stat& st, const std::string& display);
/// Reads a symlink's target bytes verbatim.
std::string read_link_at(int dirfd, const std::string& name, const std::string& display);
/// Names in the directory open as fd (without "." and ".."), unsorted. The fd's offset is not
/// disturbed (a dup shares it, so the listing rewinds first). Throws SystemError naming `display`.
/// Opens the file at the relative `path` below dirfd (O_RDONLY|O_NONBLOCK), component by component,
/// never following a symlink: an empty, "." or ".." component throws Error; a failed open throws
/// SystemError naming `display` (ELOOP: a symlink on the way).
Fd open_beneath(int dirfd, const std::string& path, const std::string& display);
std::vector<std::string> list_dir(int fd, const std::string& display);
/// What removing a tree gave back.
struct FreedBytes {
    unsigned long long apparent = 0;  // st_size of every regular file removed (each name counted)
    unsigned long long allocated = 0; // st_blocks × 512 of each regular file whose last name was removed:
                                      // the space the filesystem really got back (holes and hard links
                                      // with a name elsewhere count nothing)
};
/// Removes a tree relative to dirfd (no symlink is followed; read-only directories are made writable
/// first). A missing tree is fine. Returns the bytes of regular files removed (apparent sizes); both
/// counts are added to `freed` if given.
unsigned long long remove_tree_at(int dirfd, const std::string& name, const std::string& display,
                                  FreedBytes* freed = nullptr);
/// Creates a directory if missing.
void ensure_dir(const std::string& path, mode_t mode = 0755);
/// Raises the soft RLIMIT_NOFILE to the hard limit (read-ahead and directory fds take shares of it).
void raise_fd_limit();

} // namespace casmig::util
