#include "xlink.hpp"

#include "casmig/hash/blake3.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/xattr.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::lifecycle::detail {

using catalog::Entry;

namespace {

struct Member {
    size_t tree;
    const Entry* entry;
};

/// The directory holding the package-relative `path` of tree t (opened component by component without
/// following a symlink), and the path's last component.
std::pair<util::Fd, std::string> open_parent(const LinkTree& t, const std::string& path) {
    util::Fd cur = util::open_dir_at(t.dirfd, t.name, t.display);
    size_t pos = 0;
    for (;;) {
        size_t slash = path.find('/', pos);
        std::string comp = path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
        if (comp.empty() || comp == "." || comp == "..")
            throw util::Error("refusing path " + t.display + "/" + util::printable(path) +
                              ": not a plain relative path");
        if (slash == std::string::npos) return {std::move(cur), comp};
        cur = util::open_dir_at(cur.get(), comp, t.display + "/" + util::printable(path.substr(0, slash)));
        pos = slash + 1;
    }
}

/// What differs between two entries that a hard link would have to share; "" if nothing.
std::string meta_difference(const Entry& a, const Entry& b) {
    if (a.digest != b.digest || a.size != b.size) return "content";
    if (a.mode != b.mode) return "mode";
    if (a.uid != b.uid || a.gid != b.gid) return "owner";
    if (a.mtime_ns != b.mtime_ns) return "mtime";
    if (a.xattrs != b.xattrs) return "extended attributes";
    return {};
}

std::int64_t mtime_ns(const struct stat& st) {
    return static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
}

/// Proves that the open file fd is `want`: a regular file with its size, mode, owner, mtime, extended
/// attributes and — re-hashed — content. "" if it is, else what differs.
std::string prove_file(int fd, const struct stat& st, const Entry& want, const std::string& display) {
    if (!S_ISREG(st.st_mode)) return "is not a regular file";
    if (static_cast<std::uint64_t>(st.st_size) != want.size) return "size differs";
    if ((st.st_mode & 07777) != want.mode) return "mode differs";
    if (st.st_uid != want.uid || st.st_gid != want.gid) return "owner differs";
    if (mtime_ns(st) != want.mtime_ns) return "mtime differs";
    if (util::read_xattrs(fd, display) != want.xattrs) return "extended attributes differ";
    std::uint64_t n = 0;
    if (::lseek(fd, 0, SEEK_SET) != 0) return "cannot be read";
    if (!want.digest || hash::hash_fd(fd, display, &n) != *want.digest || n != want.size) return "content differs";
    return {};
}

/// One name in a built tree to turn into a link of the anchor.
struct Target {
    util::Fd dir;
    std::string leaf, tmp, display;
    struct timespec dir_times[2] = {}; // the directory's atime and mtime (the manifest's), put back after
};

/// Makes m's file (and its link_to siblings) in built tree `mt` hard links of anchor a's file in tree
/// `at`. Returns "" when linked; otherwise why not, with nothing changed. Throws util::Error when m's
/// tree cannot be changed as planned (a link or rename failed: the built tree is not to be published).
std::string link_one(const LinkTree& at, const Entry& a, const LinkTree& mt, const Entry& m) {
    const std::string adisp = at.display + "/" + util::printable(a.path);
    // The anchor's side: whatever is wrong there (gone, unreadable, different) only means "not linked".
    util::Fd adir, anchor;
    std::string aleaf;
    struct stat ast {};
    try {
        auto opened = open_parent(at, a.path);
        adir = std::move(opened.first);
        aleaf = std::move(opened.second);
        anchor = util::Fd(::openat(adir.get(), aleaf.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
        if (!anchor) return std::string("cannot be opened: ") + std::strerror(errno);
        if (::fstat(anchor.get(), &ast) != 0) return std::string("cannot be examined: ") + std::strerror(errno);
        // A file in place is proven against this entry (its tree was not rebuilt: it may have changed
        // since migrate, or be another inode with a reused number); one this run built from the same
        // manifest values is checked for what it shows without reading.
        if (!at.built) {
            if (std::string why = prove_file(anchor.get(), ast, m, adisp); !why.empty()) return why;
        } else if (!S_ISREG(ast.st_mode) || static_cast<std::uint64_t>(ast.st_size) != m.size ||
                   (ast.st_mode & 07777) != m.mode) {
            return "is not the file its manifest describes";
        }
    } catch (const util::Error& e) {
        return std::string("cannot be proven: ") + e.what();
    }
    // Every name of m's inode in its package: m itself and the entries linked to it.
    std::vector<Target> targets;
    std::vector<const Entry*> names{&m};
    for (const auto& e : *mt.manifest)
        if (e.link_to && *e.link_to == m.path) names.push_back(&e);
    for (const Entry* e : names) {
        auto [dir, leaf] = open_parent(mt, e->path);
        Target t{std::move(dir), leaf, {}, mt.display + "/" + util::printable(e->path)};
        struct stat dst {};
        if (::fstat(t.dir.get(), &dst) != 0)
            return std::string("its directory cannot be examined: ") + std::strerror(errno);
        t.dir_times[0] = dst.st_atim;
        t.dir_times[1] = dst.st_mtim;
        targets.push_back(std::move(t));
    }
    // Adding and renaming names moves the directories' mtimes, which build_tree() set from the manifest.
    auto restore_times = [&] {
        for (auto& t : targets) ::futimens(t.dir.get(), t.dir_times); // best effort, as build_tree's
    };
    auto undo = [&] {
        for (auto& t : targets)
            if (!t.tmp.empty()) io::unlinkat(t.dir.get(), t.tmp.c_str(), 0);
        restore_times();
    };
    // 1. A new name for the anchor beside each target; nothing is replaced yet.
    for (auto& t : targets) {
        for (unsigned n = 0;; ++n) {
            std::string tmp = ".casmig-xlink-" + std::to_string(::getpid()) + "-" + std::to_string(n);
            if (io::linkat(adir.get(), aleaf.c_str(), t.dir.get(), tmp.c_str(), 0) == 0) {
                t.tmp = tmp;
                break;
            }
            if (errno == EEXIST && n < 1000) continue;
            const int e = errno;
            undo();
            // Where a link cannot exist (another filesystem, the inode's link limit) the file stays a
            // copy; any other failure fails the package, as for a link inside it (no silent copy): the
            // next rollback links it.
            if (e == EXDEV || e == EMLINK) return std::string("cannot be linked: ") + std::strerror(e);
            throw util::SystemError("cannot link " + adisp + " at", t.display, e);
        }
        // The name linked must be the inode proven (the anchor's name could have been swapped since).
        struct stat st {};
        if (::fstatat(t.dir.get(), t.tmp.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_dev != ast.st_dev ||
            st.st_ino != ast.st_ino) {
            undo();
            return "changed while being linked";
        }
    }
    // 2. Each new name replaces the built file.
    for (auto& t : targets) {
        if (io::renameat2(t.dir.get(), t.tmp.c_str(), t.dir.get(), t.leaf.c_str(), 0) != 0) {
            int e = errno;
            undo();
            throw util::SystemError("cannot replace a rebuilt file by a hard link of " + adisp + " at", t.display, e);
        }
        t.tmp.clear();
    }
    for (auto& t : targets)
        if (::futimens(t.dir.get(), t.dir_times) != 0)
            throw util::SystemError("cannot put back the mtime of the directory of", t.display, errno);
    return {};
}

} // namespace

LinkAcross link_across(const std::vector<LinkTree>& trees, const ProblemSink& problems) {
    LinkAcross r;
    std::map<std::int64_t, std::vector<Member>> groups;
    for (size_t i = 0; i < trees.size(); ++i)
        for (const auto& e : *trees[i].manifest)
            if (e.type == catalog::EntryType::file && e.xlink && !e.link_to) groups[*e.xlink].push_back({i, &e});
    std::vector<bool> failed(trees.size(), false);
    for (auto& [group, members] : groups) {
        if (members.size() < 2 ||
            std::none_of(members.begin(), members.end(), [&](const Member& m) { return trees[m.tree].built; }))
            continue;
        // Trees in place first (they are never changed, so linking to them keeps them as they are), then
        // by package name and path: the same anchor whatever order the packages were built in.
        std::stable_sort(members.begin(), members.end(), [&](const Member& a, const Member& b) {
            const auto &ta = trees[a.tree], &tb = trees[b.tree];
            if (ta.built != tb.built) return !ta.built;
            if (ta.pkg->name != tb.pkg->name) return ta.pkg->name < tb.pkg->name;
            return a.entry->path < b.entry->path;
        });
        std::vector<const Member*> anchors;
        for (const auto& m : members) {
            const LinkTree& mt = trees[m.tree];
            if (!mt.built || failed[m.tree]) {
                if (!mt.built) anchors.push_back(&m);
                continue;
            }
            const std::string pid = util::printable(mt.pkg->name), path = util::printable(m.entry->path);
            std::string refused; // why the last candidate was not linked
            bool linked = false;
            for (const Member* a : anchors) {
                const LinkTree& at = trees[a->tree];
                std::string why = meta_difference(*a->entry, *m.entry);
                if (why.empty()) {
                    try {
                        why = link_one(at, *a->entry, mt, *m.entry);
                    } catch (const util::Error& e) {
                        failed[m.tree] = true;
                        if (problems) problems({pid, path, std::string(e.what()) + "; the package is not restored"});
                        break;
                    }
                    if (why.empty()) {
                        linked = true;
                        ++r.linked;
                        break;
                    }
                } else {
                    why += " differs";
                }
                refused = at.display + "/" + util::printable(a->entry->path) + " (" + why + ")";
            }
            if (failed[m.tree]) continue;
            if (!linked) {
                anchors.push_back(&m);
                if (!refused.empty() && problems)
                    problems({pid, path,
                              "was hard-linked to another package's file at migrate time, but is not linked to " +
                                  refused + ": restored as a separate file with its own content; nothing is lost",
                              true});
            }
        }
    }
    for (size_t i = 0; i < failed.size(); ++i)
        if (failed[i]) r.failed.push_back(i);
    return r;
}

} // namespace casmig::lifecycle::detail
