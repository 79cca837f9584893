#include "casmig/cas/object_store.hpp"

#include "casmig/util/aligned_buffer.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cctype>
#include <cstdint>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <optional>
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::cas {

std::string object_relpath(const hash::Digest& d) {
    std::string h = d.hex();
    return h.substr(0, 2) + "/" + h.substr(2);
}

std::string object_relpath(const hash::Digest& d, Form form) {
    std::string rel = object_relpath(d);
    if (form == Form::zstd) rel += k_zst_suffix;
    return rel;
}

TempFile::TempFile(TempFile&& o) noexcept
    : m_dirfd(o.m_dirfd), m_name(std::exchange(o.m_name, {})), m_fd(std::move(o.m_fd)), m_direct(o.m_direct),
      m_anonymous(std::exchange(o.m_anonymous, false)), m_size(std::exchange(o.m_size, 0)),
      m_end(std::exchange(o.m_end, 0)) {}

TempFile& TempFile::operator=(TempFile&& o) noexcept {
    if (this != &o) {
        discard(); // the file this object held is dropped; *this stays a live object
        m_dirfd = o.m_dirfd;
        m_name = std::exchange(o.m_name, {});
        m_fd = std::move(o.m_fd);
        m_direct = o.m_direct;
        m_anonymous = std::exchange(o.m_anonymous, false);
        m_size = std::exchange(o.m_size, 0);
        m_end = std::exchange(o.m_end, 0);
    }
    return *this;
}

void TempFile::stop_direct() {
    int fl = ::fcntl(m_fd.get(), F_GETFL);
    if (fl < 0 || ::fcntl(m_fd.get(), F_SETFL, fl & ~O_DIRECT) != 0)
        util::throw_errno("cannot switch off O_DIRECT", display());
    m_direct = false;
}

void TempFile::append(const char* data, size_t len) { write_data(data, len); }

namespace {
bool all_zero(const char* p, size_t n) {
    return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}
} // namespace

void TempFile::append_sparse(const char* data, size_t len) {
    // [run, pos) is data not yet written; a zero block at an aligned offset ends it.
    size_t run = 0, pos = 0;
    while (pos < len) {
        const std::uint64_t off = m_size + (pos - run);
        const size_t into = static_cast<size_t>(off % k_sparse_block);
        if (into == 0 && len - pos >= k_sparse_block && all_zero(data + pos, k_sparse_block)) {
            write_data(data + run, pos - run);
            size_t z = pos + k_sparse_block;
            while (len - z >= k_sparse_block && all_zero(data + z, k_sparse_block)) z += k_sparse_block;
            append_hole(z - pos);
            run = pos = z;
            continue;
        }
        pos += std::min<size_t>(len - pos, k_sparse_block - into);
    }
    write_data(data + run, len - run);
}

void TempFile::append_hole(std::uint64_t len) { m_size += len; }

void TempFile::finish() {
    if (m_end >= m_size) return;
    // One zero byte at the end sets the size (and allocates one block). Unaligned, so buffered.
    if (m_direct) stop_direct();
    const char zero = 0;
    for (;;) {
        ssize_t n = io::pwrite(m_fd.get(), &zero, 1, static_cast<off_t>(m_size - 1));
        if (n == 1) break;
        if (n < 0 && errno == EINTR) continue;
        util::throw_errno("write failed", display());
    }
    m_end = m_size;
}

void TempFile::write_data(const char* data, size_t len) {
    if (len == 0) return;
    if (m_end != m_size && ::lseek(m_fd.get(), static_cast<off_t>(m_size), SEEK_SET) < 0)
        util::throw_errno("seek failed", display());
    m_size += len;
    m_end = m_size;
    if (m_direct) {
        size_t aligned = len / util::k_direct_align * util::k_direct_align;
        if (reinterpret_cast<std::uintptr_t>(data) % util::k_direct_align != 0) aligned = 0;
        while (aligned > 0) {
            ssize_t n = io::write(m_fd.get(), data, aligned);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EINVAL) break; // the filesystem wants another alignment: buffered from here
            if (n < 0) util::throw_errno("write failed", display());
            // A short direct write ends on a block boundary of the device, which may not be ours:
            // finish buffered rather than reason about it.
            data += n;
            len -= static_cast<size_t>(n);
            aligned -= static_cast<size_t>(n);
            if (static_cast<size_t>(n) % util::k_direct_align != 0) break;
        }
        if (len == 0) return;
        stop_direct();
    }
    util::write_all(m_fd.get(), data, len, display());
}

void TempFile::discard() noexcept {
    m_fd.reset();
    // Never throws (the destructor and move assignment call it): a temp file we fail to unlink goes with
    // the ObjectStore's staging directory (or, after a crash, with the next run's sweep_temp()).
    if (!m_name.empty()) io::unlinkat(m_dirfd, m_name.c_str(), 0);
    m_name.clear();
    m_direct = false;
    m_anonymous = false;
    m_size = m_end = 0;
}

TempFile::~TempFile() { discard(); }

std::string TempFile::release() {
    m_fd.reset();
    m_anonymous = false;
    return std::exchange(m_name, {});
}

util::Fd TempFile::release_anonymous() {
    m_anonymous = false;
    return std::move(m_fd);
}

util::Fd TempFile::reopen_read() const {
    int fd;
    if (m_anonymous) {
        char self[32];
        std::snprintf(self, sizeof self, "/proc/self/fd/%d", m_fd.get());
        fd = ::open(self, O_RDONLY | O_CLOEXEC);
    } else {
        fd = ::openat(m_dirfd, m_name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    }
    if (fd < 0) util::throw_errno("cannot reopen temp file", display());
    return util::Fd(fd);
}

std::string TempFile::display() const { return m_anonymous ? "temp/(unnamed file)" : "temp/" + m_name; }

void sync_filesystem(int fd, const std::string& display) {
    if (io::syncfs(fd) != 0) util::throw_errno("syncfs failed", display);
}

namespace {

/// "casmig-<pid>-<16 lowercase hex>": the name own_temp_dirfd() gives a staging directory.
bool is_staging_dir_name(const std::string& n) {
    const std::string marker = k_temp_dir_marker;
    if (n.compare(0, marker.size(), marker) != 0) return false;
    size_t i = marker.size(), digits = 0;
    while (i < n.size() && std::isdigit(static_cast<unsigned char>(n[i]))) ++i, ++digits;
    if (digits == 0 || i >= n.size() || n[i] != '-') return false;
    std::string rest = n.substr(i + 1);
    return rest.size() == 16 && std::all_of(rest.begin(), rest.end(), [](char c) {
               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
           });
}

/// Entries directly in temp/ that belong to the lifecycle commands (cleanup and remove move legacy
/// trees aside to trash-<id>, rollback stages rollback-<id>); they recover them from their journal.
bool is_lifecycle_entry(const std::string& n) { return n.rfind("trash-", 0) == 0 || n.rfind("rollback-", 0) == 0; }

std::string random_hex16() {
    unsigned char b[8] = {};
    if (::getrandom(b, sizeof b, 0) != static_cast<ssize_t>(sizeof b)) {
        // No entropy source: pid, time and an address still make a collision practically impossible,
        // and mkdir(EEXIST) makes one harmless.
        std::uint64_t v = static_cast<std::uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ull ^
                          static_cast<std::uint64_t>(std::time(nullptr)) ^ reinterpret_cast<std::uintptr_t>(&b);
        std::memcpy(b, &v, sizeof b);
    }
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned char c : b) out.push_back(hex[c >> 4]), out.push_back(hex[c & 15]);
    return out;
}

/// Removes a staging directory whose lock the caller holds (its own, or a dead owner's) with the lock
/// file last: a removal killed halfway leaves a directory that still carries a free lock (or nothing),
/// which the next sweep_temp() finishes — never a lockless leftover that would look foreign.
void remove_staging_dir(int temp_fd, const std::string& name, const std::string& display) {
    int dfd = ::openat(temp_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        if (errno == ENOENT) return;
        util::throw_errno("cannot open directory", display);
    }
    util::Fd dir(dfd);
    for (const auto& n : util::list_dir(dfd, display))
        if (n != k_temp_lock_name) util::remove_tree_at(dfd, n, display + "/" + util::printable(n));
    if (::unlinkat(dfd, k_temp_lock_name, 0) != 0 && errno != ENOENT)
        util::throw_errno("cannot remove", display + "/" + k_temp_lock_name);
    if (::unlinkat(temp_fd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
        util::throw_errno("cannot remove directory", display);
}

std::string parent_of(const std::string& path) {
    std::string p = path;
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    auto pos = p.rfind('/');
    if (pos == std::string::npos) return ".";
    return pos == 0 ? "/" : p.substr(0, pos);
}

} // namespace

ObjectStore::ObjectStore(const std::string& objects_dir, const std::string& temp_dir)
    : m_objects_path(objects_dir), m_temp_path(temp_dir),
      m_quarantine_path(parent_of(objects_dir) + "/" + k_quarantine_dir),
      m_packages_path(parent_of(objects_dir) + "/packages"), m_objects(util::open_dir(objects_dir)),
      m_dicts(parent_of(objects_dir) + "/" + k_dict_dir) {
    // temp/ is emptied of what casmig left there: never follow a symlink to somebody else's directory.
    int fd = ::open(temp_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && (errno == ELOOP || errno == ENOTDIR))
        throw util::RefusedError(temp_dir + " is a symlink or not a directory: casmig stages files there and removes "
                                 "what it left; move it out of the way (mv " + temp_dir + " " + temp_dir +
                                 ".old) and rerun");
    if (fd < 0) util::throw_errno("cannot open directory", temp_dir);
    m_temp = util::Fd(fd);
    // Objects belong to the store's owner (the owner of objects/). root writing for another owner
    // hands each new object over (verify --objects would otherwise report every one).
    struct stat st {};
    if (::geteuid() == 0 && ::fstat(m_objects.get(), &st) == 0 && (st.st_uid != 0 || st.st_gid != ::getegid()))
        m_owner = std::make_pair(st.st_uid, st.st_gid);
}

int ObjectStore::own_temp_dirfd() {
    int cached = m_own_fd.load(std::memory_order_acquire);
    if (cached >= 0) return cached;
    std::lock_guard lk(m_own_mutex);
    if (m_own) return m_own.get();
    const std::string prefix = std::string(k_temp_dir_marker) + std::to_string(::getpid()) + "-";
    int last_errno = 0;
    for (int attempt = 0; attempt < 16; ++attempt) {
        std::string name = prefix + random_hex16();
        // Not through io::: this directory is scratch space, never durable, and fault tests count the
        // object steps (its per-thread subdirectories keep going through io::mkdirat).
        if (::mkdirat(m_temp.get(), name.c_str(), 0700) != 0) {
            if (errno == EEXIST) continue;
            util::throw_errno("cannot create staging directory", m_temp_path + "/" + name);
        }
        int dfd = ::openat(m_temp.get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0) {
            last_errno = errno;
            if (errno == ENOENT) continue; // a sweep took it in the instant before we could lock it
            util::throw_errno("cannot open staging directory", m_temp_path + "/" + name);
        }
        util::Fd dir(dfd);
        int lfd = ::openat(dfd, k_temp_lock_name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (lfd < 0) {
            last_errno = errno;
            if (errno == ENOENT) continue;
            util::throw_errno("cannot create lock file", m_temp_path + "/" + name + "/" + k_temp_lock_name);
        }
        util::Fd lock(lfd);
        if (::flock(lfd, LOCK_EX | LOCK_NB) != 0) {
            last_errno = errno;
            if (errno == EWOULDBLOCK) continue; // a sweep holds it: that sweep removes the directory
            util::throw_errno("cannot lock", m_temp_path + "/" + name + "/" + k_temp_lock_name);
        }
        // A sweep may have locked and removed the directory between our create and our flock: only a
        // lock file that is still at its name protects anything.
        struct stat mine {};
        struct stat there {};
        std::string lock_rel = name + "/" + k_temp_lock_name;
        if (::fstat(lfd, &mine) != 0 ||
            ::fstatat(m_temp.get(), lock_rel.c_str(), &there, AT_SYMLINK_NOFOLLOW) != 0 ||
            mine.st_ino != there.st_ino || mine.st_dev != there.st_dev) {
            last_errno = ENOENT;
            continue;
        }
        m_own = std::move(dir);
        m_own_lock = std::move(lock);
        m_own_name = name;
        m_own_fd.store(m_own.get(), std::memory_order_release);
        return m_own.get();
    }
    throw util::SystemError("cannot create a staging directory", m_temp_path, last_errno ? last_errno : EEXIST);
}

std::string ObjectStore::own_temp_name() const {
    std::lock_guard lk(m_own_mutex);
    return m_own_name;
}

std::optional<Form> ObjectStore::form_on_disk(const hash::Digest& d) const {
    for (Form f : {Form::raw, Form::zstd}) {
        struct stat st {};
        std::string rel = object_relpath(d, f);
        if (::fstatat(m_objects.get(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
            if (errno == ENOENT) continue;
            util::throw_errno("cannot stat object", m_objects_path + "/" + rel);
        }
        if (S_ISREG(st.st_mode)) return f;
    }
    return std::nullopt;
}

bool ObjectStore::on_disk(const hash::Digest& d, std::uint64_t* size) const {
    // A raw object's size is its file's: one lstat, no open (verify asks this for every object a
    // manifest needs). Only a .zst one is opened, for its frame header.
    struct stat st {};
    const std::string raw = object_relpath(d, Form::raw);
    if (::fstatat(m_objects.get(), raw.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
        if (S_ISREG(st.st_mode)) {
            if (size) *size = static_cast<std::uint64_t>(st.st_size);
            return true;
        }
    } else if (errno != ENOENT) {
        util::throw_errno("cannot stat object", m_objects_path + "/" + raw);
    }
    // Not a raw object: its .zst form, without stat-ing the raw name a second time.
    const std::string zst = object_relpath(d, Form::zstd);
    if (::fstatat(m_objects.get(), zst.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) return false;
        util::throw_errno("cannot stat object", m_objects_path + "/" + zst);
    }
    if (!S_ISREG(st.st_mode)) return false;
    if (!size) return true;
    try {
        ObjectReader r = open_file(zst);
        *size = r.content_size();
    } catch (const CorruptObject&) {
        *size = UINT64_MAX;
    } catch (const util::SystemError& e) {
        if (e.code() == ENOENT) return false; // gone meanwhile
        throw;
    }
    return true;
}

bool ObjectStore::has_stored(const hash::Digest& d, std::uint64_t size, std::uint64_t stored_size) const {
    // A .zst object is stored only when its frame saves bytes (worth_compressing): stored == size is raw.
    const std::string rel = object_relpath(d, stored_size == size ? Form::raw : Form::zstd);
    struct stat st {};
    return ::fstatat(m_objects.get(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) &&
           static_cast<std::uint64_t>(st.st_size) == stored_size;
}

ObjectReader ObjectStore::open_file(const std::string& rel) const {
    const bool zst = rel.size() > k_zst_suffix.size() && rel.compare(rel.size() - k_zst_suffix.size(), k_zst_suffix.size(),
                                                                         k_zst_suffix) == 0;
    std::string display = m_objects_path + "/" + rel;
    int fd = ::openat(m_objects.get(), rel.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) util::throw_errno("cannot open object", display);
    return ObjectReader(util::Fd(fd), zst ? Form::zstd : Form::raw, std::move(display), &m_dicts);
}

ObjectReader ObjectStore::open_content(const hash::Digest& d) const {
    try {
        return open_file(object_relpath(d, Form::raw));
    } catch (const util::SystemError& e) {
        if (e.code() != ENOENT) throw;
    }
    try {
        return open_file(object_relpath(d, Form::zstd));
    } catch (const util::SystemError& e) {
        if (e.code() != ENOENT) throw;
    }
    throw util::SystemError("cannot open object", m_objects_path + "/" + object_relpath(d), ENOENT);
}

std::optional<std::uint64_t> ObjectStore::stored_size(const hash::Digest& d) const {
    std::lock_guard lk(m_mutex);
    auto it = m_stored.find(d);
    if (it == m_stored.end()) return std::nullopt;
    return it->second;
}

std::optional<std::string> ObjectStore::check_on_disk(const hash::Digest& d, std::optional<std::uint64_t> size,
                                                      Form form) const {
    std::string rel = object_relpath(d, form);
    std::string display = m_objects_path + "/" + rel;
    int fd = ::openat(m_objects.get(), rel.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return std::nullopt;
        if (errno == ELOOP) return std::string("is a symlink, not the object");
        util::throw_errno("cannot open object", display);
    }
    util::Fd owned(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) util::throw_errno("cannot stat object", display);
    if (!S_ISREG(st.st_mode)) return std::string("is not a regular file");
    hash::Digest got;
    if (form == Form::raw) {
        if (size && static_cast<std::uint64_t>(st.st_size) != *size)
            return "has " + std::to_string(st.st_size) + " bytes, the object has " + std::to_string(*size);
        got = hash::hash_fd(fd, display);
    } else {
        ObjectReader r(util::Fd(::dup(fd)), Form::zstd, display, &m_dicts);
        try {
            std::uint64_t n = r.content_size();
            if (size && n != *size) return "decompresses to " + std::to_string(n) + " bytes, the object has " + std::to_string(*size);
            got = hash_content(r);
        } catch (const CorruptObject& e) {
            return std::string(e.what());
        }
    }
    if (got != d) return "content hashes to " + got.hex();
    // The right content: it stays. Objects are never writable (best effort: a file we do not own
    // keeps its mode, and verify --objects reports it).
    if ((st.st_mode & 07777) != 0444) ::fchmod(fd, 0444);
    std::lock_guard lk(m_mutex);
    m_stored[d] = static_cast<std::uint64_t>(st.st_size);
    return std::string();
}

bool ObjectStore::exists(const hash::Digest& d, std::optional<std::uint64_t> size) const {
    bool trusting;
    std::shared_ptr<const hash::DigestFilter> forgotten;
    {
        std::lock_guard lk(m_mutex);
        if (m_staged.count(d) || m_good.count(d)) return true;
        trusting = m_trusting;
        forgotten = m_forgotten; // trust_catalog() may replace it: this lookup keeps the one it read
    }
    if (trusting) return cataloged(d, forgotten.get());
    // Not trusted by name: a file at the name is the object only if its content says so. A bad one
    // answers "absent"; publish() then moves it aside and puts the object in its place.
    auto why = check_on_disk(d, size, Form::raw);
    // A bad raw file does not hide a good .zst one (publish() moves the raw one aside if it writes raw).
    if (!why || !why->empty()) why = check_on_disk(d, size, Form::zstd);
    if (!why || !why->empty()) return false;
    std::lock_guard lk(m_mutex);
    m_good.insert(d);
    return true;
}

void ObjectStore::trust_catalog(std::function<bool(const hash::Digest&)> cataloged, bool nothing_cataloged) {
    std::lock_guard lk(m_mutex);
    m_cataloged = std::move(cataloged);
    m_trusting = static_cast<bool>(m_cataloged);
    m_forgotten = m_trusting && nothing_cataloged ? std::make_shared<hash::DigestFilter>() : nullptr;
}

bool ObjectStore::cataloged(const hash::Digest& d, const hash::DigestFilter* forgotten) const {
    // Ordering: forget_cataloged() adds d to the filter and drops it from m_good under m_mutex; a caller
    // that found d neither staged nor good took m_mutex after that, so it sees the filter's bits.
    if (forgotten && !forgotten->maybe_contains(d)) return false;
    return m_cataloged(d);
}

void ObjectStore::forget_cataloged(const std::vector<hash::Digest>& digests) {
    std::lock_guard lk(m_mutex);
    if (!m_trusting) return; // nothing else would answer for them
    for (const auto& d : digests) {
        if (m_forgotten) m_forgotten->add(d); // cataloged now, whether or not it is forgotten below
        if (m_staged.count(d)) continue;
        m_good.erase(d);
        m_stored.erase(d);
    }
}

TempFile ObjectStore::create_temp(std::uint64_t size_hint) {
    const int own = own_temp_dirfd();
    // Process-wide counter: several ObjectStores of one process (and threads) never pick one name.
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t n = ++counter;
    // Each thread creates its files in its own subdirectory: creating entries in one shared
    // directory serialises the threads on that directory's lock (measured: 10% of CPU spinning).
    static std::atomic<unsigned> threads{0};
    thread_local const unsigned slot = threads++ % 64;
    char subdir_buf[16];
    std::snprintf(subdir_buf, sizeof subdir_buf, "w%u/", slot);
    const std::string subdir = subdir_buf;
    const std::string display_dir = m_temp_path + "/" + m_own_name + "/";
    if (!m_subdir_made[slot].load(std::memory_order_acquire)) {
        std::string d = subdir.substr(0, subdir.size() - 1);
        if (io::mkdirat(own, d.c_str(), 0700) != 0 && errno != EEXIST)
            util::throw_errno("cannot create directory", display_dir + d);
        m_subdir_made[slot].store(true, std::memory_order_release);
    }
    static const std::string prefix = std::string(k_temp_marker) + std::to_string(::getpid()) + "-";
    std::string name;
    name.reserve(subdir.size() + prefix.size() + 20);
    name.append(subdir).append(prefix).append(std::to_string(n));
    // Created read-only: the fd we hold may still write, nobody else can, and no fchmod is needed.
    bool direct = size_hint >= k_direct_min && !m_no_direct.load(std::memory_order_relaxed);
    auto open_it = [&] {
        int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (direct ? O_DIRECT : 0);
        int fd = io::openat_create(own, name.c_str(), flags, 0444);
        if (fd < 0 && errno == EINVAL && direct) { // tmpfs and others refuse O_DIRECT: remember, go buffered
            m_no_direct.store(true, std::memory_order_relaxed);
            direct = false;
            fd = io::openat_create(own, name.c_str(), flags & ~O_DIRECT, 0444);
        }
        return fd;
    };
    int fd = open_it();
    if (fd < 0 && errno == ENOENT) { // publish() tidied the subdirectory away meanwhile
        io::mkdirat(own, subdir.substr(0, subdir.size() - 1).c_str(), 0700);
        m_subdir_made[slot].store(true, std::memory_order_release);
        fd = open_it();
    }
    if (fd < 0) util::throw_errno("cannot create temp file", display_dir + name);
    if (m_owner && ::fchown(fd, m_owner->first, m_owner->second) != 0) {
        int err = errno;
        io::unlinkat(own, name.c_str(), 0);
        ::close(fd);
        throw util::SystemError("cannot hand the temp file to the store's owner", display_dir + name, err);
    }
    return TempFile(own, std::move(name), util::Fd(fd), direct);
}

bool ObjectStore::probe_unnamed_link(int own) noexcept {
    // linkat() by fd (AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; through /proc/self/fd/N it needs /proc
    // (and may be refused by a security module). If neither gives an unnamed file a name here, staged
    // files are named ones from the start: a publish that cannot place its batch would fail the run.
    // Only a refusal decides that (EPERM, EACCES, ENOENT, EOPNOTSUPP, EXDEV, ENOSYS): a full disk or an
    // I/O error is publish()'s to report, and does not turn unnamed files off for the store's life.
    // The probe's name is in this process's own staging directory: a crash leaves an empty file there,
    // which the next run removes with the directory. A file system without O_TMPFILE is found out by
    // create_staging_temp() itself.
    util::Fd fd(io::open_tmpfile(own, O_WRONLY | O_CLOEXEC, 0444));
    if (!fd) return true;
    const char* probe = "link-probe";
    bool ok = io::linkat(fd.get(), "", own, probe, AT_EMPTY_PATH) == 0;
    if (!ok) {
        char self[32];
        std::snprintf(self, sizeof self, "/proc/self/fd/%d", fd.get());
        ok = io::linkat(AT_FDCWD, self, own, probe, AT_SYMLINK_FOLLOW) == 0;
        if (ok) m_no_empty_path.store(true, std::memory_order_relaxed);
        else if (errno != EPERM && errno != EACCES && errno != ENOENT && errno != EOPNOTSUPP && errno != EXDEV &&
                 errno != ENOSYS)
            return true;
    }
    if (ok) io::unlinkat(own, probe, 0);
    return ok;
}

TempFile ObjectStore::create_staging_temp(std::uint64_t size_hint) {
    // Its own staging directory first: creating it may throw, which a call_once callable must not.
    const int own = own_temp_dirfd();
    std::call_once(m_anonymous_once, [this, own]() noexcept {
        // An eighth of the open-file limit (read-ahead takes at most half, see ingest::read_ahead_files(),
        // directories an eighth per holder of them), read once: the pipeline raised the soft limit
        // before it staged anything.
        struct rlimit rl {};
        size_t budget = 128;
        if (::getrlimit(RLIMIT_NOFILE, &rl) == 0)
            budget = rl.rlim_cur == RLIM_INFINITY ? size_t{1} << 17 : static_cast<size_t>(rl.rlim_cur / 8);
        // Test seam: tests choose the named path (0), or a mix of both (a few).
        if (io::seams_enabled())
            if (const char* v = std::getenv("CASMIG_ANON_BUDGET"); v && *v) budget = std::strtoull(v, nullptr, 10);
        // An unnamed file is of use only if publish() can give it a name (asked once, before any is
        // staged) and TempFile::reopen_read() can open it again (through /proc/self/fd).
        if (budget > 0 && (::access("/proc/self/fd", X_OK) != 0 || !probe_unnamed_link(own))) m_no_anonymous.store(true);
        m_anonymous_budget.store(budget, std::memory_order_relaxed);
    });
    const size_t budget = m_anonymous_budget.load(std::memory_order_relaxed);
    if (m_no_anonymous.load(std::memory_order_relaxed) || m_staged_anonymous.load(std::memory_order_relaxed) >= budget)
        return create_temp(size_hint);
    bool direct = size_hint >= k_direct_min && !m_no_direct.load(std::memory_order_relaxed);
    int fd = io::open_tmpfile(own, O_WRONLY | O_CLOEXEC | (direct ? O_DIRECT : 0), 0444);
    if (fd < 0 && errno == EINVAL && direct) {
        direct = false;
        fd = io::open_tmpfile(own, O_WRONLY | O_CLOEXEC, 0444);
        if (fd >= 0) m_no_direct.store(true, std::memory_order_relaxed);
    }
    if (fd < 0) {
        // No O_TMPFILE on this filesystem (EOPNOTSUPP; EISDIR or EINVAL from kernels or filesystems that
        // do not know it): named files from now on. Anything else (ENOSPC, EMFILE) is the named path's
        // error too, and it reports it.
        if (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL) m_no_anonymous.store(true);
        return create_temp(size_hint);
    }
    util::Fd owned(fd);
    if (m_owner && ::fchown(fd, m_owner->first, m_owner->second) != 0)
        util::throw_errno("cannot hand the temp file to the store's owner", m_temp_path + "/" + m_own_name + "/(unnamed file)");
    return TempFile(TempFile::Anonymous{}, own, std::move(owned), direct);
}

StageResult ObjectStore::stage(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, Form form, std::uint64_t stored) {
    return stage_checked(d, std::move(tmp), size, DiskChecked::no, form, form == Form::raw ? size : stored);
}

StageResult ObjectStore::stage_checked(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, DiskChecked checked,
                                       Form form, std::uint64_t stored) {
    // Objects are never writable: create_temp() made the file 0444 before it got any name.
    if (checked == DiskChecked::no && exists(d, size)) return StageResult::already_present; // tmp's destructor unlinks it
    tmp.finish(); // a trailing hole gets its size before anything can read the file
    if (form == Form::raw) {
        // A sparse object takes its allocated blocks, not its size (status's stored bytes): the smaller
        // of the two, so that a small file's one block does not count as more than its bytes.
        struct stat st {};
        if (::fstat(tmp.fd(), &st) == 0)
            stored = std::min<std::uint64_t>(stored, static_cast<std::uint64_t>(st.st_blocks) * 512);
    }
    std::lock_guard lk(m_mutex);
    // Re-check under the lock: another thread may have staged the same content meanwhile.
    if (m_staged.count(d)) return StageResult::already_present;
    if (tmp.anonymous()) {
        m_staged.emplace(d, Staged{std::string(), tmp.release_anonymous(), false, size, form, stored});
        m_staged_anonymous.fetch_add(1, std::memory_order_relaxed);
    } else {
        m_staged.emplace(d, Staged{tmp.release(), util::Fd(), false, size, form, stored});
    }
    m_staged_bytes += stored;
    return StageResult::staged;
}

std::optional<TempFile> ObjectStore::compressed_temp(std::string_view data) {
    if (!m_compressor || data.size() < k_compress_min) return std::nullopt;
    thread_local std::string frame;
    m_compressor->compress(data.data(), data.size(), frame);
    if (!worth_compressing(data.size(), frame.size())) return std::nullopt;
    TempFile t = create_staging_temp(frame.size());
    t.append(frame.data(), frame.size());
    return t;
}

void ObjectStore::stage_other_form(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, Form form,
                                   std::uint64_t stored) {
    stage_checked(d, std::move(tmp), size, DiskChecked::yes, form, stored);
}

std::string ObjectStore::prove_form(const hash::Digest& d, std::optional<std::uint64_t> size, Form form) const {
    return check_on_disk(d, size, form).value_or("is missing");
}

StageResult ObjectStore::stage_bytes(const hash::Digest& d, std::string_view data) {
    if (exists(d, data.size())) return StageResult::already_present;
    if (auto t = compressed_temp(data)) {
        const std::uint64_t stored = t->size();
        return stage_checked(d, std::move(*t), data.size(), DiskChecked::yes, Form::zstd, stored);
    }
    TempFile t = create_staging_temp(data.size());
    t.append_sparse(data.data(), data.size());
    return stage_checked(d, std::move(t), data.size(), DiskChecked::yes, Form::raw, data.size()); // exists() just looked
}

size_t ObjectStore::staged_count() const {
    std::lock_guard lk(m_mutex);
    return m_staged.size();
}

std::string ObjectStore::quarantine(const std::string& rel) {
    // migration/ exists in a store; corrupt/ is made on first use.
    if (io::mkdirat(AT_FDCWD, m_quarantine_path.c_str(), 0700) != 0 && errno != EEXIST)
        util::throw_errno("cannot create quarantine directory", m_quarantine_path);
    util::Fd q = util::open_dir(m_quarantine_path);
    std::string base = rel.size() > 3 && rel[2] == '/' ? rel.substr(0, 2) + rel.substr(3) : rel;
    for (unsigned n = 1;; ++n) {
        std::string name = base + "." + std::to_string(n);
        if (io::renameat2(m_objects.get(), rel.c_str(), q.get(), name.c_str(), RENAME_NOREPLACE) == 0) {
            return std::string(k_quarantine_dir) + "/" + name;
        }
        if (errno == EEXIST && n < 100000) continue; // an earlier quarantine of the same name stays
        util::throw_errno("cannot move aside", m_objects_path + "/" + util::printable(rel));
    }
}

bool ObjectStore::place(const hash::Digest& d, const std::string& tmpname, int anon_fd, std::uint64_t size,
                        Form form, PublishStats& stats) {
    const int own = own_temp_dirfd();
    const std::string rel = object_relpath(d, form);
    char self[32] = "";
    if (anon_fd >= 0) std::snprintf(self, sizeof self, "/proc/self/fd/%d", anon_fd);
    for (int attempt = 0;; ++attempt) {
        // An unnamed file gets its first name; link() never replaces (what is there is dealt with below).
        // By its fd (AT_EMPTY_PATH: needs CAP_DAC_READ_SEARCH, else ENOENT) or through /proc/self/fd.
        int rc;
        if (anon_fd >= 0 && !m_no_empty_path.load(std::memory_order_relaxed)) {
            rc = io::linkat(anon_fd, "", m_objects.get(), rel.c_str(), AT_EMPTY_PATH);
            if (rc != 0 && errno == ENOENT) {
                rc = io::linkat(AT_FDCWD, self, m_objects.get(), rel.c_str(), AT_SYMLINK_FOLLOW);
                if (rc == 0) m_no_empty_path.store(true, std::memory_order_relaxed); // only once /proc worked
            }
        } else if (anon_fd >= 0) {
            rc = io::linkat(AT_FDCWD, self, m_objects.get(), rel.c_str(), AT_SYMLINK_FOLLOW);
        } else {
            rc = io::renameat2(own, tmpname.c_str(), m_objects.get(), rel.c_str(), RENAME_NOREPLACE);
        }
        if (rc != 0 && errno == EINVAL && anon_fd < 0) {
            // Filesystems without RENAME_NOREPLACE: link() never replaces either.
            rc = io::linkat(own, tmpname.c_str(), m_objects.get(), rel.c_str(), 0);
            if (rc == 0) io::unlinkat(own, tmpname.c_str(), 0);
        }
        if (rc == 0) {
            ++stats.objects;
            return true;
        }
        if (attempt >= 4) break; // something keeps putting files there: do not loop for ever
        if (errno == ENOENT) {
            // The fan-out directory is missing (deleted by hand): recreate it and retry.
            io::mkdirat(m_objects.get(), rel.substr(0, 2).c_str(), 0755);
            continue;
        }
        if (errno != EEXIST) break;
        bool known, trusting;
        std::shared_ptr<const hash::DigestFilter> forgotten;
        {
            std::lock_guard lk(m_mutex);
            known = m_good.count(d) > 0;
            trusting = m_trusting;
            forgotten = m_forgotten;
        }
        if (!known && trusting) known = cataloged(d, forgotten.get());
        // Trusted only when the catalog (or this process) vouches for it; otherwise its content decides.
        std::optional<std::string> why = known ? std::string() : check_on_disk(d, size, form);
        if (!why) continue; // gone meanwhile: place ours
        if (why->empty()) {
            if (anon_fd < 0) io::unlinkat(own, tmpname.c_str(), 0); // an unnamed one goes with its fd
            return false;
        }
        stats.quarantined.push_back({d, quarantine(rel), *why});
        io::crash_point("publish.quarantined");
    }
    util::throw_errno("cannot place object", m_objects_path + "/" + rel);
}

PublishStats ObjectStore::publish() {
    // Snapshot what is staged now; the entries stay in m_staged (visible to exists() and stage(), so
    // nobody writes the same content again meanwhile) until they are under objects/.
    struct Item {
        hash::Digest digest;
        std::string tmpname; // "" for an unnamed file: fd is all there is of it
        util::Fd fd;
        std::uint64_t size;
        Form form;
        std::uint64_t stored;
        bool placed = false; // under objects/: by us, or found there and checked
    };
    std::vector<Item> batch;
    std::uint64_t bytes;
    {
        std::lock_guard lk(m_mutex);
        batch.reserve(m_staged.size());
        for (auto& [d, st] : m_staged)
            if (!std::exchange(st.publishing, true))
                batch.push_back({d, std::move(st.name), std::move(st.fd), st.size, st.form, st.stored});
        bytes = std::exchange(m_staged_bytes, 0);
    }
    // Whatever happens, the batch leaves m_staged; only what is really under objects/ becomes known,
    // and a staged file that was not placed is removed (a rerun writes it again).
    struct Forget {
        ObjectStore& s;
        std::vector<Item>& b;
        int own;
        bool durable = false;
        ~Forget() {
            std::lock_guard lk(s.m_mutex);
            for (auto& it : b) {
                s.m_staged.erase(it.digest);
                if (it.placed && durable) {
                    s.m_good.insert(it.digest);
                    s.m_stored.emplace(it.digest, it.stored); // a copy found there and kept keeps its own entry
                }
                if (it.fd) {
                    it.fd.reset(); // an unnamed file not placed is gone now
                    s.m_staged_anonymous.fetch_sub(1, std::memory_order_relaxed);
                } else if (!it.placed) {
                    io::unlinkat(own, it.tmpname.c_str(), 0); // best effort; ENOENT if renamed
                }
            }
        }
    } forget{*this, batch, batch.empty() ? -1 : own_temp_dirfd()};
    PublishStats stats;
    if (batch.empty()) return stats;
    // Step 2: every staged file's data reaches the disk before any of them gets an object name.
    sync_filesystem(m_temp.get(), m_temp_path);
    stats.synced_staged = true;
    io::crash_point("publish.staged-durable");
    // Step 3, by as many threads as are free (the pipeline's, once it is done): in digest order, so
    // that each thread works through its own fan-out directories (each name added takes its lock).
    std::sort(batch.begin(), batch.end(), [](const Item& a, const Item& b) { return a.digest < b.digest; });
    std::mutex stats_mutex;
    auto place_range = [&](const tbb::blocked_range<size_t>& r) {
        PublishStats mine;
        struct Merge {
            PublishStats& from;
            PublishStats& into;
            std::mutex& m;
            ~Merge() {
                std::lock_guard lk(m);
                into.objects += from.objects;
                for (auto& q : from.quarantined) into.quarantined.push_back(std::move(q));
            }
        } merge{mine, stats, stats_mutex}; // what was placed is counted even when a later one throws
        for (size_t i = r.begin(); i != r.end(); ++i) {
            Item& it = batch[i];
            io::crash_point("publish.rename");
            place(it.digest, it.tmpname, it.fd ? it.fd.get() : -1, it.size, it.form, mine);
            it.placed = true;
        }
    };
    tbb::parallel_for(tbb::blocked_range<size_t>(0, batch.size(), 512), place_range);
    stats.bytes = bytes;
    // Step 4: the new directory entries are durable before the catalog refers to them.
    io::crash_point("publish.renamed");
    sync_filesystem(m_objects.get(), m_objects_path);
    forget.durable = true;
    io::crash_point("publish.durable");
    tidy_temp();
    return stats;
}

void ObjectStore::tidy_temp() {
    int own = m_own_fd.load(std::memory_order_acquire);
    if (own < 0) return;
    // Remove the per-thread subdirectories that are empty (a busy one fails with ENOTEMPTY and stays;
    // create_temp() recreates a removed one).
    for (size_t i = 0; i < m_subdir_made.size(); ++i) {
        if (!m_subdir_made[i].load()) continue;
        char d[16];
        std::snprintf(d, sizeof d, "w%zu", i);
        if (::unlinkat(own, d, AT_REMOVEDIR) == 0) m_subdir_made[i].store(false);
    }
}

void ObjectStore::remove_own_temp() noexcept {
    if (!m_own) return;
    try {
        // Everything in it is this process's and nothing refers to it: staged files never published
        // (a failed run's) go too, so that a failed run does not leave the disk full.
        remove_staging_dir(m_temp.get(), m_own_name, m_temp_path + "/" + m_own_name);
    } catch (const util::Error&) {
        // Dropped on purpose (destructors never throw): the next locked run's sweep_temp() removes it
        // once our lock is released.
    }
    m_own_fd.store(-1);
    m_own.reset();
    m_own_lock.reset(); // the lock goes last: a sweep must not take a directory we are still emptying
}

ObjectStore::~ObjectStore() { remove_own_temp(); }

TempSweep ObjectStore::sweep_temp() {
    TempSweep r;
    const std::string mine = own_temp_name();
    for (const auto& n : util::list_dir(m_temp.get(), m_temp_path)) {
        if (is_lifecycle_entry(n) || (!mine.empty() && n == mine)) continue;
        if (!is_staging_dir_name(n)) {
            r.foreign.push_back(n);
            continue;
        }
        const std::string display = m_temp_path + "/" + n;
        int dfd = ::openat(m_temp.get(), n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0) {
            if (errno == ENOENT) continue; // its owner finished meanwhile
            if (errno == ELOOP || errno == ENOTDIR) {
                r.foreign.push_back(n); // named like ours, but not a directory: not ours
                continue;
            }
            util::throw_errno("cannot open directory", display);
        }
        util::Fd dir(dfd);
        int lfd = ::openat(dfd, k_temp_lock_name, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (lfd < 0) {
            if (errno != ENOENT) {
                r.foreign.push_back(n);
                continue;
            }
            // No lock file: its owner is between mkdir and creating the lock (it notices a removal and
            // picks another name), or died there — or somebody else made it. Only an empty one goes.
            if (util::list_dir(dfd, display).empty()) {
                if (::unlinkat(m_temp.get(), n.c_str(), AT_REMOVEDIR) == 0) ++r.removed;
            } else {
                r.foreign.push_back(n);
            }
            continue;
        }
        util::Fd lock(lfd);
        struct stat st {};
        if (::fstat(lfd, &st) != 0 || !S_ISREG(st.st_mode)) {
            r.foreign.push_back(n);
            continue;
        }
        if (::flock(lfd, LOCK_EX | LOCK_NB) != 0) {
            if (errno == EWOULDBLOCK) continue; // its owner is alive: its files are in use
            util::throw_errno("cannot lock", display + "/" + k_temp_lock_name);
        }
        // The owner is dead (its lock died with it) and the lock is ours until the tree is gone.
        remove_staging_dir(m_temp.get(), n, display);
        ++r.removed;
    }
    std::sort(r.foreign.begin(), r.foreign.end());
    return r;
}

size_t ObjectStore::discard_staged(const std::function<bool(const hash::Digest&)>& keep) {
    // On a full disk: the staged files no finished package needs go now, so that publish() and the
    // catalog commit have room. publish() already removes what it failed to place.
    size_t removed = 0;
    const int own = m_own_fd.load(std::memory_order_acquire);
    {
        std::lock_guard lk(m_mutex);
        for (auto it = m_staged.begin(); it != m_staged.end();) {
            if (it->second.publishing || (keep && keep(it->first))) {
                ++it;
                continue;
            }
            if (it->second.fd) { // unnamed: closing it frees its blocks
                it->second.fd.reset();
                m_staged_anonymous.fetch_sub(1, std::memory_order_relaxed);
                ++removed;
            } else if (own >= 0 && io::unlinkat(own, it->second.name.c_str(), 0) == 0) {
                ++removed;
            }
            m_staged_bytes -= std::min(m_staged_bytes, it->second.stored);
            it = m_staged.erase(it);
        }
    }
    tidy_temp();
    return removed;
}

hash::Digest ObjectStore::store_dictionary(std::string_view bytes, const std::string& command) {
    hash::Hasher h;
    h.update(bytes.data(), bytes.size());
    const hash::Digest d = h.finish();
    const std::string name = d.hex();
    const std::string dict_path = m_dicts.dir();
    TempFile tmp = create_temp(0);
    tmp.append(bytes.data(), bytes.size());
    if (io::fsync(tmp.fd()) != 0) util::throw_errno("fsync failed", m_temp_path + "/" + tmp.name());
    io::crash_point((command + ".dict-staged").c_str());
    // packages/ exists in a store (Store::ensure_layout); dict/ is made on first use.
    util::Fd packages = util::open_dir(m_packages_path);
    if (io::mkdirat(packages.get(), "dict", 0755) == 0) {
        if (io::fsync(packages.get()) != 0) util::throw_errno("fsync failed", m_packages_path);
    } else if (errno != EEXIST) {
        util::throw_errno("cannot create directory", dict_path);
    }
    util::Fd dir = util::open_dir_at(packages.get(), "dict", dict_path);
    for (int attempt = 0;; ++attempt) {
        if (io::renameat2(tmp.dirfd(), tmp.name().c_str(), dir.get(), name.c_str(), RENAME_NOREPLACE) == 0) {
            tmp.release(); // the name is gone from temp/: nothing left to unlink
            break;
        }
        if (errno != EEXIST || attempt > 2) util::throw_errno("cannot place dictionary", dict_path + "/" + name);
        // Something is there already: the same dictionary (a rerun) stays; anything else is moved aside.
        try {
            if (m_dicts.load(d) == bytes) break; // tmp's destructor removes our copy
        } catch (const util::Error&) {
        }
        if (io::mkdirat(AT_FDCWD, m_quarantine_path.c_str(), 0700) != 0 && errno != EEXIST)
            util::throw_errno("cannot create quarantine directory", m_quarantine_path);
        util::Fd q = util::open_dir(m_quarantine_path);
        std::string aside = "dict-" + name + "." + std::to_string(::time(nullptr)) + "." + std::to_string(attempt);
        if (io::renameat2(dir.get(), name.c_str(), q.get(), aside.c_str(), RENAME_NOREPLACE) != 0 && errno != ENOENT)
            util::throw_errno("cannot move aside", dict_path + "/" + name);
    }
    io::crash_point((command + ".dict-renamed").c_str());
    if (io::fsync(dir.get()) != 0) util::throw_errno("fsync failed", dict_path);
    io::crash_point((command + ".dict-written").c_str());
    return d;
}

void ObjectStore::for_each_shard(const std::function<void(const std::vector<std::string>&)>& f) const {
    std::vector<std::string> fan;
    for (const auto& n : util::list_dir(m_objects.get(), m_objects_path)) {
        if (n.size() == 2 && std::isxdigit(static_cast<unsigned char>(n[0])) && std::isxdigit(static_cast<unsigned char>(n[1])))
            fan.push_back(n);
    }
    std::sort(fan.begin(), fan.end());
    // One listing helper, one error policy (util::list_dir): a fan-out directory that cannot be read
    // is an error, never a silently shorter list (gc and fsck decide from it).
    for (const auto& dir : fan) {
        struct stat st {};
        if (::fstatat(m_objects.get(), dir.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) continue;
        util::Fd d = util::open_dir_at(m_objects.get(), dir, m_objects_path + "/" + dir);
        std::vector<std::string> names = util::list_dir(d.get(), m_objects_path + "/" + dir);
        for (auto& n : names) n = dir + "/" + n;
        f(names);
    }
}

std::vector<std::string> ObjectStore::list_files() const {
    std::vector<std::string> out;
    for_each_shard([&](const std::vector<std::string>& names) { out.insert(out.end(), names.begin(), names.end()); });
    return out;
}

} // namespace casmig::cas
