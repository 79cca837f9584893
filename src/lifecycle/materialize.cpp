#include "materialize.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/xattr.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/fs.h>
#include <map>
#include <memory>
#include <set>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <unordered_map>

namespace casmig::lifecycle::detail {

using catalog::Entry;
using catalog::EntryType;

namespace {

struct timespec to_ts(std::int64_t ns) {
    struct timespec t {};
    t.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    t.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    if (t.tv_nsec < 0) {
        t.tv_nsec += 1'000'000'000;
        --t.tv_sec;
    }
    return t;
}

/// Splits "a/b/c" into "a/b" and "c"; refuses components that could escape ("", ".", "..").
std::pair<std::string, std::string> split(const std::string& path, const std::string& dest) {
    auto pos = path.rfind('/');
    std::string parent = pos == std::string::npos ? "" : path.substr(0, pos);
    std::string name = pos == std::string::npos ? path : path.substr(pos + 1);
    if (name.empty() || name == "." || name == ".." || path.find('\0') != std::string::npos)
        throw util::Error("refusing manifest path '" + util::printable(path) + "' for " + dest +
                          ": it is not a plain relative path (the catalog is damaged: run casmig verify)");
    return {parent, name};
}

/// Kernel-side copy of bytes [off, off + len) of src to the same offset of dst; falls back to
/// read/write. Returns the bytes copied (fewer only if src ends early).
std::uint64_t copy_range(int src, int dst, std::uint64_t off, std::uint64_t len, const std::string& display) {
    if (::lseek(src, static_cast<off_t>(off), SEEK_SET) < 0 || ::lseek(dst, static_cast<off_t>(off), SEEK_SET) < 0)
        util::throw_errno("seek failed", display);
    std::uint64_t left = len;
    bool kernel = true;
    while (left > 0 && kernel) {
        ssize_t n = io::copy_file_range(src, dst, static_cast<size_t>(std::min<std::uint64_t>(left, 1ull << 30)));
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
                kernel = false;
                break;
            }
            util::throw_errno("copy failed", display);
        }
        if (n == 0) return len - left;
        left -= static_cast<std::uint64_t>(n);
    }
    if (left > 0) {
        std::vector<char> buf(256 * 1024);
        auto at = static_cast<off_t>(off + (len - left));
        if (::lseek(dst, at, SEEK_SET) < 0) util::throw_errno("seek failed", display);
        while (left > 0) {
            ssize_t n = ::pread(src, buf.data(), static_cast<size_t>(std::min<std::uint64_t>(buf.size(), left)), at);
            if (n < 0) {
                if (errno == EINTR) continue;
                util::throw_errno("read failed", display);
            }
            if (n == 0) return len - left;
            util::write_all(dst, buf.data(), static_cast<size_t>(n), display);
            at += n;
            left -= static_cast<std::uint64_t>(n);
        }
    }
    return len;
}

/// Copies a whole object into the empty file dst. A sparse object (fewer blocks than its size) is
/// copied extent by extent (SEEK_DATA/SEEK_HOLE), so its holes stay holes; a trailing hole gets the
/// size by writing the last byte, as cas::TempFile::finish() does.
void copy_data(int src, int dst, std::uint64_t size, const std::string& display) {
    auto short_object = [&] {
        return util::Error("object for " + display + " is shorter than its manifest size: run casmig verify --objects");
    };
    struct stat st {};
    bool sparse = ::fstat(src, &st) == 0 && static_cast<std::uint64_t>(st.st_blocks) * 512 < size;
    std::uint64_t off = 0, end = 0; // end: of the last byte written to dst
    while (sparse && off < size) {
        off_t d = ::lseek(src, static_cast<off_t>(off), SEEK_DATA);
        if (d < 0 && errno == ENXIO) break; // a hole up to the end
        if (d < 0) {
            sparse = false; // no SEEK_DATA here: the rest is copied whole
            break;
        }
        off = std::min(static_cast<std::uint64_t>(d), size);
        if (off >= size) break;
        off_t e = ::lseek(src, static_cast<off_t>(off), SEEK_HOLE);
        std::uint64_t stop = e > d ? std::min(static_cast<std::uint64_t>(e), size) : size;
        if (copy_range(src, dst, off, stop - off, display) != stop - off) throw short_object();
        off = end = stop;
    }
    if (!sparse) {
        if (copy_range(src, dst, off, size - off, display) != size - off) throw short_object();
        return;
    }
    if (st.st_size < static_cast<off_t>(size)) throw short_object();
    if (end < size) {
        const char zero = 0;
        if (io::pwrite(dst, &zero, 1, static_cast<off_t>(size - 1)) != 1) util::throw_errno("write failed", display);
    }
}

/// Writes the object's uncompressed bytes into dst: a raw object by the kernel (copy_data), a .zst one
/// decompressed through the reader. Throws util::Error if the object is shorter or longer than `size`.
void copy_object(cas::ObjectReader& src, int dst, std::uint64_t size, const std::string& display) {
    if (src.form() == cas::Form::raw) return copy_data(src.fd(), dst, size, display);
    thread_local std::vector<char> buf(256 * 1024);
    std::uint64_t total = 0;
    for (;;) {
        size_t n = src.read(buf.data(), buf.size());
        if (n == 0) break;
        total += n;
        if (total > size) break;
        util::write_all(dst, buf.data(), n, display);
    }
    if (total != size)
        throw util::Error("object for " + display + " has " + std::to_string(total) + " bytes, its manifest says " +
                          std::to_string(size) + ": run casmig verify --objects");
}

class Builder {
public:
    Builder(int dest_fd, std::string display, cas::ObjectStore& objects, LinkMode link, MaterializeResult& r)
        : m_root(dest_fd), m_display(std::move(display)), m_objects(objects), m_link(link), m_r(r),
          m_root_user(::geteuid() == 0),
          m_root_fd(std::make_shared<util::Fd>(::dup(dest_fd))) {}

    void build(const std::vector<Entry>& manifest) {
        // BLOB order puts a directory before everything below it.
        std::map<std::string, const Entry*> sorted;
        for (const auto& e : manifest) sorted.emplace(e.path, &e);
        std::vector<const Entry*> dirs;
        for (auto& [path, e] : sorted) {
            if (path.empty()) {
                if (e->type != EntryType::dir) throw util::Error("manifest root of " + m_display + " is not a directory");
                dirs.push_back(e);
                continue;
            }
            auto [parent, name] = split(path, m_display);
            auto parent_fd = dir_fd(parent); // kept alive while this entry is written
            int pfd = parent_fd->get();
            std::string disp = m_display + "/" + util::printable(path);
            switch (e->type) {
            case EntryType::dir:
                if (io::mkdirat(pfd, name.c_str(), 0700) != 0) util::throw_errno("cannot create directory", disp);
                m_dirs.insert(path);
                dirs.push_back(e);
                ++m_r.dirs;
                break;
            case EntryType::symlink: {
                if (::symlinkat(e->target.c_str(), pfd, name.c_str()) != 0) util::throw_errno("cannot create symlink", disp);
                if (m_root_user) ::fchownat(pfd, name.c_str(), e->uid, e->gid, AT_SYMLINK_NOFOLLOW);
                struct timespec ts[2] = {to_ts(e->mtime_ns), to_ts(e->mtime_ns)};
                ::utimensat(pfd, name.c_str(), ts, AT_SYMLINK_NOFOLLOW); // best effort: some filesystems refuse
                ++m_r.symlinks;
                break;
            }
            case EntryType::file:
                write_file(*e, pfd, name, disp);
                break;
            }
        }
        // Modes and mtimes of directories last, deepest first: creating children changes a
        // directory's mtime, and a read-only directory would refuse them.
        for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
            const Entry& e = **it;
            auto dfd = e.path.empty() ? nullptr : dir_fd(e.path);
            int fd = dfd ? dfd->get() : m_root;
            std::string disp = m_display;
            if (!e.path.empty()) disp.append("/").append(util::printable(e.path));
            if (m_root_user) ::fchown(fd, e.uid, e.gid);
            if (::fchmod(fd, e.mode & 07777) != 0) util::throw_errno("cannot chmod", disp);
            if (!e.xattrs.empty()) util::write_xattrs(fd, e.xattrs, disp);
            struct timespec ts[2] = {to_ts(e.mtime_ns), to_ts(e.mtime_ns)};
            if (::futimens(fd, ts) != 0) util::throw_errno("cannot set mtime", disp);
        }
    }

private:
    /// fd of a directory this build created (or the root), opened component by component with
    /// O_NOFOLLOW. A parent that is not such a directory is refused.
    std::shared_ptr<util::Fd> dir_fd(const std::string& path) {
        if (path.empty()) return m_root_fd;
        auto it = m_fds.find(path);
        if (it != m_fds.end()) return it->second;
        if (!m_dirs.count(path))
            throw util::Error("refusing manifest of " + m_display + ": '" + util::printable(path) +
                              "' is used as a directory but the manifest does not create it as one (a crafted or "
                              "damaged manifest; run casmig verify)");
        auto [parent, name] = split(path, m_display);
        auto pfd = dir_fd(parent);
        int fd = ::openat(pfd->get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) util::throw_errno("cannot open directory", m_display + "/" + util::printable(path));
        // Bound the cache (at most 256 fds, and an eighth of the open-file limit: a deep tree must not
        // run out of fds); an evicted fd stays open while a caller still holds it.
        static const size_t k_cache_max = [] {
            struct rlimit rl {};
            if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return size_t{256};
            return std::clamp<size_t>(rl.rlim_cur / 8, 4, 256);
        }();
        if (m_fds.size() >= k_cache_max) m_fds.clear();
        return m_fds.emplace(path, std::make_shared<util::Fd>(fd)).first->second;
    }

    void finish_copy(int fd, const Entry& e, const std::string& disp) {
        if (m_root_user) ::fchown(fd, e.uid, e.gid); // before chmod: chown clears setuid/setgid
        if (::fchmod(fd, e.mode & 07777) != 0) util::throw_errno("cannot chmod", disp);
        // after data, owner and mode: writing or chown clears security.capability
        if (!e.xattrs.empty()) util::write_xattrs(fd, e.xattrs, disp);
        struct timespec ts[2] = {to_ts(e.mtime_ns), to_ts(e.mtime_ns)};
        if (::futimens(fd, ts) != 0) util::throw_errno("cannot set mtime", disp);
    }

    void copy_file(const Entry& e, int pfd, const std::string& name, const std::string& disp, bool try_reflink) {
        cas::ObjectReader src = m_objects.open_content(*e.digest);
        int fd = io::openat_create(pfd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) util::throw_errno("cannot create file", disp);
        util::Fd dst(fd);
        bool cloned = false;
        // A compressed object cannot be cloned: its bytes are not the file's.
        if (try_reflink && e.size > 0 && src.form() == cas::Form::raw) cloned = ::ioctl(fd, FICLONE, src.fd()) == 0;
        if (cloned) io::note_written(fd);
        if (!cloned) copy_object(src, fd, e.size, disp);
        finish_copy(fd, e, disp);
        if (cloned) ++m_r.reflinked;
        else ++m_r.copied;
        if (src.form() == cas::Form::zstd) ++m_r.decompressed;
    }

    /// The object, or a variant of it whose mode is `mode` (created once, never writable), to link to.
    std::string link_source(const Entry& e, std::uint32_t mode) {
        std::string rel = cas::object_relpath(*e.digest);
        if (mode == 0444) return rel;
        char suffix[16];
        std::snprintf(suffix, sizeof suffix, ".m%03o", mode);
        std::string variant = rel + suffix;
        struct stat st {};
        if (::fstatat(m_objects.dirfd(), variant.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) return variant;
        // Build the variant like an object: temp file, data, mode, fsync, then link without replacing.
        cas::TempFile tmp = m_objects.create_temp();
        cas::ObjectReader src = m_objects.open_content(*e.digest);
        copy_object(src, tmp.fd(), e.size, "objects/" + variant);
        if (::fchmod(tmp.fd(), mode) != 0) util::throw_errno("cannot chmod", "temp/" + tmp.name());
        util::fsync_fd(tmp.fd(), "temp/" + tmp.name());
        std::string tname = tmp.name();
        // The temp file is in this process's own locked staging directory (cas/object_store.hpp, temp/):
        // a locked command running meanwhile leaves it alone.
        if (io::linkat(tmp.dirfd(), tname.c_str(), m_objects.dirfd(), variant.c_str(), 0) != 0 && errno != EEXIST)
            util::throw_errno("cannot create object variant", m_objects.dir() + "/" + variant);
        return variant; // tmp's destructor unlinks the temp name
    }

    void write_file(const Entry& e, int pfd, const std::string& name, const std::string& disp) {
        if (!e.digest) throw util::Error("manifest entry " + disp + " has no object digest (damaged catalog: run casmig verify)");
        ++m_r.files;
        m_r.bytes += e.size;
        // A hard link inside the package: recreate it as one.
        // A copy instead would silently lose the tree's hard-link structure, which rollback promises to
        // restore exactly: a link that cannot be made is an error for this package.
        if (e.link_to) {
            if (!m_files.count(*e.link_to))
                throw util::Error("manifest entry " + disp + " is a hard link of '" + util::printable(*e.link_to) +
                                  "', which the manifest does not create before it (damaged catalog: run casmig verify)");
            auto [lparent, lname] = split(*e.link_to, m_display);
            auto lfd = dir_fd(lparent);
            if (io::linkat(lfd->get(), lname.c_str(), pfd, name.c_str(), 0) != 0)
                util::throw_errno("cannot recreate hard link to " + m_display + "/" + util::printable(*e.link_to) + " at", disp);
            ++m_r.linked;
            return;
        }
        if (m_link == LinkMode::hardlink) {
            // Never link setuid/setgid files: a shared inode would spread the privilege to every user
            // of the object. Other files link to the object or to a read-only variant that keeps the
            // file's read and exec bits (write bits may differ, as documented).
            std::uint32_t mode = e.mode & 07777;
            // Files with extended attributes (capabilities, ACLs) get their own copy too, and so do files
            // whose object is stored compressed (zstd mode): a link needs the raw bytes, and making a raw
            // variant would give back the space compression saved; they are decompressed instead and
            // counted (MaterializeResult::decompressed), so the command can say so.
            if (!(mode & 06000) && e.xattrs.empty() && m_objects.form_on_disk(*e.digest) == cas::Form::raw) {
                try {
                    std::string src = link_source(e, mode & 0555);
                    if (io::linkat(m_objects.dirfd(), src.c_str(), pfd, name.c_str(), 0) == 0) {
                        ++m_r.linked;
                        m_files.emplace(e.path, true);
                        return;
                    }
                    // ENOENT: a convert running meanwhile replaced the raw object by its .zst form
                    // (placed before the raw one went): copy_file() below finds it.
                    if (errno != EMLINK && errno != EXDEV && errno != EPERM && errno != EACCES && errno != ENOENT)
                        util::throw_errno("cannot link", disp);
                } catch (const util::SystemError& err) {
                    if (err.code() != EMLINK && err.code() != EXDEV && err.code() != EPERM && err.code() != EACCES &&
                        err.code() != EROFS && err.code() != ENOENT)
                        throw;
                }
            }
        }
        copy_file(e, pfd, name, disp, m_link == LinkMode::reflink || m_link == LinkMode::hardlink);
        m_files.emplace(e.path, true);
    }

    int m_root;
    std::string m_display;
    cas::ObjectStore& m_objects;
    LinkMode m_link;
    MaterializeResult& m_r;
    bool m_root_user;
    std::unordered_map<std::string, std::shared_ptr<util::Fd>> m_fds;
    std::shared_ptr<util::Fd> m_root_fd;
    std::unordered_map<std::string, bool> m_files;
    std::set<std::string> m_dirs;
};

} // namespace

void build_tree(int dest_fd, const std::string& dest_display, const std::vector<Entry>& manifest,
                cas::ObjectStore& objects, LinkMode link, MaterializeResult& result) {
    Builder b(dest_fd, dest_display, objects, link, result);
    b.build(manifest);
}

} // namespace casmig::lifecycle::detail
