#include "casmig/ingest/ingest.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdint>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include "casmig/util/aligned_buffer.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/xattr.hpp"

namespace casmig::ingest {

// Files up to this size are read into one buffer, hashed, and written only if the object is new
// (most files of a package store are small and already present). Larger files are streamed: each
// buffer is hashed and written to the temp file in the same pass, so the object can never differ
// from what was hashed, and memory stays at one buffer per worker thread (at most k_whole_file).
// Buffers are aligned so that large objects can be written with O_DIRECT (cas::TempFile::append()).
static constexpr std::uint64_t k_whole_file = 8 << 20;
static constexpr size_t k_chunk = 1 << 20;

static bool same_file(const struct stat& a, const struct stat& b) {
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino && a.st_size == b.st_size &&
           a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec &&
           a.st_ctim.tv_sec == b.st_ctim.tv_sec && a.st_ctim.tv_nsec == b.st_ctim.tv_nsec;
}

[[noreturn]] static void changed(const walk::Item& item) {
    throw walk::PackageError(item.entry.path, "changed while being migrated (size, mtime or ctime moved); rerun "
                                              "migrate --retry-failed once the package is no longer being modified");
}

static ssize_t read_some(int fd, char* buf, size_t len, util::RateLimiter* limiter) {
    if (limiter) limiter->acquire(len);
    for (;;) {
        ssize_t n = ::read(fd, buf, len);
        if (n >= 0 || errno != EINTR) return n;
    }
}

util::Fd try_open_item(const walk::Item& item) noexcept {
    // O_NONBLOCK: if a fifo was swapped in since the walk, open() must not wait for a writer.
    constexpr int k_flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK;
    int fd = ::openat(item.parent->get(), item.name.c_str(), k_flags | O_NOATIME);
    if (fd < 0 && errno == EPERM) // O_NOATIME is only allowed to the file's owner
        fd = ::openat(item.parent->get(), item.name.c_str(), k_flags);
    return util::Fd(fd);
}

util::Fd open_item(const walk::Item& item) {
    util::Fd fd = try_open_item(item);
    if (!fd) {
        int e = errno;
        if (e == ENOENT || e == ELOOP) changed(item);
        throw walk::PackageError(item.entry.path, std::string("cannot open: ") + std::strerror(e) +
                                                      (e == EACCES ? " (make it readable or run casmig as its owner)" : ""));
    }
    return fd;
}

static std::uint64_t open_file_limit() {
    struct rlimit rl {};
    std::uint64_t avail = 1024;
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0)
        avail = rl.rlim_cur == RLIM_INFINITY ? (1u << 20) : static_cast<std::uint64_t>(rl.rlim_cur);
    return avail;
}

// The open-file budget: half of RLIMIT_NOFILE for read-ahead, an eighth for the directories that
// walked items keep open (dir_refs_per_holder()), walk::k_open_dirs per walker, and the rest for the
// catalog, temp files and whatever the caller holds.
size_t read_ahead_files(unsigned holders) {
    std::uint64_t each = open_file_limit() / 2 / std::max(1u, holders);
    return static_cast<size_t>(std::clamp<std::uint64_t>(each, 1, 256));
}

size_t dir_refs_per_holder(unsigned holders) {
    return static_cast<size_t>(std::max<std::uint64_t>(1, open_file_limit() / 8 / std::max(1u, holders)));
}

void prefetch(int fd, std::uint64_t size) {
    // Asynchronous: the kernel queues the reads and returns. Capped, so that a huge file does not
    // push the rest of the page cache out before it is read (its streaming reads get read-ahead anyway).
    constexpr std::uint64_t k_max = 4 << 20;
    if (size > 0) ::posix_fadvise(fd, 0, static_cast<off_t>(std::min(size, k_max)), POSIX_FADV_WILLNEED);
}

// A large file in the zstd store mode: each buffer is hashed and fed to the thread's compression
// stream, whose output goes to a temp file — memory stays one buffer and one zstd context per worker.
// Whether the frame is worth keeping is known only at the end; if it is not, the raw object is made by
// decompressing that temp file into a second one (the bytes that were hashed, re-hashed to be sure)
// rather than by reading the legacy file again, which may have changed meanwhile.
static IngestResult ingest_compressed(const walk::Item& item, int fd, cas::ObjectStore& objects,
                                      util::RateLimiter* limiter) {
    const std::string& path = item.entry.path;
    const struct stat& before = item.st;
    const auto expected = static_cast<std::uint64_t>(before.st_size);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    thread_local util::AlignedBuffer buf;
    buf.reserve(k_chunk);
    hash::Hasher hasher;
    // Buffered (size hint 0): the frame is read back if it is not worth keeping.
    cas::TempFile zst = objects.create_staging_temp(0);
    cas::Compressor::Stream z(*objects.compressor(), expected);
    std::uint64_t total = 0, stored = 0;
    auto sink = [&](const char* p, size_t n) {
        zst.append(p, n);
        stored += n;
    };
    for (;;) {
        ssize_t n = read_some(fd, buf.data(), k_chunk, limiter);
        if (n < 0) {
            int e = errno;
            struct stat now {};
            if (::fstat(fd, &now) != 0 || !S_ISREG(now.st_mode) || !same_file(before, now)) changed(item);
            throw walk::PackageError(path, std::string("read failed: ") + std::strerror(e));
        }
        if (n == 0) break;
        total += static_cast<std::uint64_t>(n);
        if (total > expected) changed(item); // the frame's pledged size would be exceeded
        hasher.update(buf.data(), static_cast<size_t>(n));
        z.feed(buf.data(), static_cast<size_t>(n), sink);
    }
    if (total != expected) changed(item);
    struct stat after {};
    if (::fstat(fd, &after) != 0 || !same_file(before, after)) changed(item);
    z.finish(sink);
    IngestResult r;
    r.digest = hasher.finish();
    r.size = total;
    if (objects.exists(r.digest, total)) return r; // zst's destructor removes the temp file
    if (cas::worth_compressing(total, stored)) {
        r.new_object = objects.stage(r.digest, std::move(zst), total, cas::Form::zstd, stored) == cas::StageResult::staged;
        return r;
    }
    const std::string display = zst.display();
    util::Fd back = zst.reopen_read();
    cas::ObjectReader rd(std::move(back), cas::Form::zstd, display, &objects.dictionaries());
    cas::TempFile raw = objects.create_staging_temp(total);
    hash::Hasher again;
    for (;;) {
        size_t n = rd.read(buf.data(), k_chunk);
        if (n == 0) break;
        again.update(buf.data(), n);
        raw.append(buf.data(), n);
    }
    if (again.finish() != r.digest)
        throw util::Error("zstd round trip of " + util::printable(path) + " changed its bytes (a zstd or memory fault)");
    r.new_object = objects.stage(r.digest, std::move(raw), total) == cas::StageResult::staged;
    return r;
}

IngestResult ingest_file(const walk::Item& item, cas::ObjectStore* objects, StoreObject store,
                         util::RateLimiter* limiter) {
    return ingest_open(item, open_item(item), objects, store, limiter);
}

IngestResult ingest_open(const walk::Item& item, util::Fd owned, cas::ObjectStore* objects, StoreObject store,
                         util::RateLimiter* limiter) {
    const std::string& path = item.entry.path;
    const int fd = owned.get();
    // The walker's lstat is the "before" state: one fstat after the read, compared with it, proves
    // this is the same inode, unchanged in size, mtime and ctime from walk to end of read.
    const struct stat& before = item.st;
    const auto expected = static_cast<std::uint64_t>(before.st_size);
    auto read_error = [&](int e) -> void {
        struct stat now {};
        if (::fstat(fd, &now) != 0 || !S_ISREG(now.st_mode) || !same_file(before, now)) changed(item);
        throw walk::PackageError(path, std::string("read failed: ") + std::strerror(e));
    };

    IngestResult r;
    hash::Hasher hasher;
    std::uint64_t total = 0;
    thread_local util::AlignedBuffer buf;
    if (expected <= k_whole_file) {
        // One extra byte detects a file that grew since fstat.
        const size_t want = static_cast<size_t>(expected) + 1;
        buf.reserve(want);
        // A short read of a regular file means end of file, so one read() usually suffices; a
        // file that grew meanwhile fills the extra byte, one that changed otherwise is caught by
        // the fstat below.
        while (total < want) {
            ssize_t n = read_some(fd, buf.data() + total, want - total, limiter);
            if (n < 0) read_error(errno);
            if (n == 0) break;
            total += static_cast<std::uint64_t>(n);
            if (total == expected) break;
        }
        if (total != expected) changed(item);
        hasher.update(buf.data(), total);
        r.digest = hasher.finish();
        struct stat after {};
        if (::fstat(fd, &after) != 0 || !same_file(before, after)) changed(item);
        if (store == StoreObject::yes && objects)
            r.new_object = objects->stage_bytes(r.digest, std::string_view(buf.data(), total)) == cas::StageResult::staged;
    } else if (store == StoreObject::yes && objects && objects->compressor()) {
        r = ingest_compressed(item, fd, *objects, limiter);
        total = r.size;
    } else {
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        buf.reserve(k_chunk);
        cas::TempFile tmp;
        bool writing = store == StoreObject::yes && objects;
        if (writing) tmp = objects->create_staging_temp(expected);
        // A file with holes (fewer blocks allocated than its size) is read extent by extent: its holes
        // are hashed as the zeros they read as, without being read, and stay holes in the object.
        bool holes = static_cast<std::uint64_t>(before.st_blocks) * 512 < expected;
        std::uint64_t extent_end = holes ? 0 : UINT64_MAX; // end of the data extent being read
        for (;;) {
            if (holes && total >= extent_end) {
                off_t d = ::lseek(fd, static_cast<off_t>(total), SEEK_DATA);
                if (d < 0 && errno != ENXIO) { // no SEEK_DATA on this filesystem: read everything
                    holes = false;
                    extent_end = UINT64_MAX;
                    if (::lseek(fd, static_cast<off_t>(total), SEEK_SET) < 0) read_error(errno);
                    continue;
                }
                // ENXIO: no data from here on, a hole up to the size the walk saw. Beyond that size it
                // is not a hole but growth, which the read below finds.
                std::uint64_t data = d < 0 ? expected : static_cast<std::uint64_t>(d);
                data = std::max(total, std::min(data, expected));
                hasher.update_zeros(data - total);
                if (writing) tmp.append_hole(data - total);
                total = data;
                off_t e = ::lseek(fd, static_cast<off_t>(total), SEEK_HOLE);
                extent_end = e > d && e >= 0 ? static_cast<std::uint64_t>(e) : total + k_chunk;
                if (::lseek(fd, static_cast<off_t>(total), SEEK_SET) < 0) read_error(errno);
            }
            const size_t want = static_cast<size_t>(std::min<std::uint64_t>(k_chunk, extent_end - total));
            ssize_t n = read_some(fd, buf.data(), want, limiter);
            if (n < 0) read_error(errno);
            if (n == 0) break;
            hasher.update(buf.data(), static_cast<size_t>(n));
            if (writing) tmp.append_sparse(buf.data(), static_cast<size_t>(n));
            total += static_cast<std::uint64_t>(n);
        }
        if (total != expected) changed(item);
        struct stat after {};
        if (::fstat(fd, &after) != 0 || !same_file(before, after)) changed(item);
        r.digest = hasher.finish();
        if (writing) r.new_object = objects->stage(r.digest, std::move(tmp), total) == cas::StageResult::staged;
    }
    r.size = total;
    try {
        r.xattrs = util::read_xattrs(fd, path);
    } catch (const util::SystemError& e) {
        throw walk::PackageError(path, std::string("cannot read extended attributes: ") + std::strerror(e.code()));
    }
    return r;
}

} // namespace casmig::ingest
