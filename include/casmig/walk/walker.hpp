// casmig::walk — walks one legacy package tree without ever following a symlink.
//
// Every directory is opened relative to its parent's fd with O_NOFOLLOW, every entry is lstat'ed
// relative to its directory's fd, so path length and depth are unbounded (no PATH_MAX) and a symlink
// swapped in during the walk is never traversed. Names are bytes: any byte but '/' and NUL.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <sys/stat.h>
#include <utility>
#include <vector>

#include "casmig/catalog/catalog.hpp"
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
    catalog::Entry entry;
    std::shared_ptr<util::Fd> parent; // files only
    std::string name;                 // last path component (files only)
    struct stat st {};                // lstat at walk time, for change detection
};

/// Explains an lstat mode that casmig cannot store ("a fifo", "a socket", ...); empty if storable.
std::string unsupported_type(mode_t mode);

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
        std::shared_ptr<util::Fd> fd;
        std::string prefix;
        std::vector<std::string> names;
        size_t pos = 0;
    };
    void push_dir(std::shared_ptr<util::Fd> fd, std::string prefix);
    std::vector<Frame> m_stack;
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
