// casmig::walk — walks one legacy package tree without ever following a symlink.
//
// Every directory is opened relative to its parent's fd with O_NOFOLLOW, every entry is lstat'ed
// relative to its directory's fd, so path length and depth are unbounded (no PATH_MAX) and a symlink
// swapped in during the walk is never traversed. Names are bytes: any byte but '/' and NUL.
//
// Bounded by depth, linearly: the walker keeps one path string (the current directory's) and, per
// level, only that directory's entry names. It holds at most k_open_dirs directory fds however deep
// the tree is: an ancestor further up is closed, and reopened on the way back up as ".." of its child
// (never a symlink), then checked to be the very directory (device, inode) that was walked down, so a
// directory moved or replaced meanwhile fails the package instead of being walked.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <sys/stat.h>
#include <utility>
#include <vector>

#include "casmig/manifest/manifest.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::walk {

/// A problem with one package's content: the package fails, the others carry on.
/// `path` is the byte path inside the package ("" for the root).
class PackageError : public util::Error {
public:
    PackageError(std::string path, const std::string& msg) : util::Error(msg), m_path(std::move(path)) {}
    const std::string& path() const { return m_path; }

private:
    std::string m_path;
};

/// One entry of a walk. For files, `parent` keeps the containing directory open so that a later
/// stage can open the file by `name` relative to it (openat + O_NOFOLLOW), however deep it is.
struct Item {
    manifest::Entry entry;
    std::shared_ptr<util::Fd> parent; // files only
    std::string name;                 // last path component (files only)
    struct stat st {};                // lstat at walk time, for change detection
};

/// Explains an lstat mode that casmig cannot store ("a fifo", "a socket", ...); empty if storable.
std::string unsupported_type(mode_t mode);

/// Directory fds one walker keeps open at most (its own; an Item's `parent` keeps its directory open
/// until the Item lets go). Small: reopening an ancestor costs two syscalls when the walk returns to it.
inline constexpr size_t k_open_dirs = 4;

/// Preorder walk of one package tree: first the root itself (path ""), then each directory's
/// entries sorted by name bytes, descending into directories as they come.
class PackageWalker {
public:
    /// Opens <store_fd>/<package> (no symlink followed). Throws PackageError if it cannot.
    PackageWalker(int store_fd, const std::string& package);
    /// Next item, or false at the end. Throws PackageError for a special file, an unreadable
    /// directory, or an entry that vanished during the walk.
    bool next(Item& out);

private:
    struct Frame {
        std::shared_ptr<util::Fd> fd; // null while closed (more than k_open_dirs below the top)
        std::vector<std::string> names;
        size_t pos = 0;
        size_t path_len = 0;          // this directory's path is m_path.substr(0, path_len)
        dev_t dev = 0;                // identity of the directory walked, checked when it is reopened
        ino_t ino = 0;
    };
    void push_dir(std::shared_ptr<util::Fd> fd, const struct stat& st);
    void pop_dir();
    util::Fd reopen(size_t index);
    std::vector<Frame> m_stack;
    std::string m_path; // path of the top frame's directory ("" for the root)
    bool m_root_pending = true;
    struct stat m_root_st {};
    std::string m_root_xattrs;
    std::map<std::pair<dev_t, ino_t>, std::string> m_links; // hard-linked inodes seen: first path
};

/// Joins a package-relative path and a name ("" + "a" = "a", "a" + "b" = "a/b").
inline std::string join(const std::string& prefix, const std::string& name) {
    return prefix.empty() ? name : prefix + "/" + name;
}

} // namespace casmig::walk
