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
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::cas {

std::string object_relpath(const hash::Digest& d) {
    std::string h = d.hex();
    return h.substr(0, 2) + "/" + h.substr(2);
}

TempFile::TempFile(TempFile&& o) noexcept
    : m_dirfd(o.m_dirfd), m_name(std::exchange(o.m_name, {})), m_fd(std::move(o.m_fd)), m_direct(o.m_direct) {}

TempFile& TempFile::operator=(TempFile&& o) noexcept {
    if (this != &o) {
        this->~TempFile();
        m_dirfd = o.m_dirfd;
        m_name = std::exchange(o.m_name, {});
        m_fd = std::move(o.m_fd);
        m_direct = o.m_direct;
    }
    return *this;
}

void TempFile::stop_direct() {
    int fl = ::fcntl(m_fd.get(), F_GETFL);
    if (fl < 0 || ::fcntl(m_fd.get(), F_SETFL, fl & ~O_DIRECT) != 0)
        util::throw_errno("cannot switch off O_DIRECT", "temp/" + m_name);
    m_direct = false;
}

void TempFile::append(const char* data, size_t len) {
    if (m_direct) {
        size_t aligned = len / util::k_direct_align * util::k_direct_align;
        if (reinterpret_cast<std::uintptr_t>(data) % util::k_direct_align != 0) aligned = 0;
        while (aligned > 0) {
            ssize_t n = io::write(m_fd.get(), data, aligned);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && errno == EINVAL) break; // the filesystem wants another alignment: buffered from here
            if (n < 0) util::throw_errno("write failed", "temp/" + m_name);
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
    util::write_all(m_fd.get(), data, len, "temp/" + m_name);
}

TempFile::~TempFile() {
    m_fd.reset();
    // Destructors never throw: a temp file we fail to unlink is removed by the next run's
    // remove_stale_temp().
    if (!m_name.empty()) io::unlinkat(m_dirfd, m_name.c_str(), 0);
}

std::string TempFile::release() {
    m_fd.reset();
    return std::exchange(m_name, {});
}

void sync_filesystem(int fd, const std::string& display) {
    if (io::syncfs(fd) != 0) util::throw_errno("syncfs failed", display);
}

ObjectStore::ObjectStore(const std::string& objects_dir, const std::string& temp_dir)
    : m_objects_path(objects_dir), m_temp_path(temp_dir), m_objects(util::open_dir(objects_dir)),
      m_temp(util::open_dir(temp_dir)) {}

bool ObjectStore::on_disk(const hash::Digest& d, std::uint64_t* size) const {
    struct stat st {};
    std::string rel = object_relpath(d);
    if (::fstatat(m_objects.get(), rel.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT) return false;
        util::throw_errno("cannot stat object", m_objects_path + "/" + rel);
    }
    if (size) *size = static_cast<std::uint64_t>(st.st_size);
    return S_ISREG(st.st_mode);
}

bool ObjectStore::exists(const hash::Digest& d) const {
    {
        std::lock_guard lk(m_mutex);
        if (m_staged.count(d)) return true;
        if (m_trusting) return m_published.count(d) || std::binary_search(m_known.begin(), m_known.end(), d);
    }
    return on_disk(d);
}

void ObjectStore::trust_catalog(std::vector<hash::Digest> known) {
    std::sort(known.begin(), known.end());
    std::lock_guard lk(m_mutex);
    m_known = std::move(known);
    m_trusting = true;
}

TempFile ObjectStore::create_temp(std::uint64_t size_hint) {
    // Process-wide counter: several ObjectStores of one process (and threads) never pick one name.
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t n = ++counter;
    // Each thread creates its files in its own subdirectory of temp/: creating entries in one shared
    // directory serialises the threads on that directory's lock (measured: 10% of CPU spinning).
    static std::atomic<unsigned> threads{0};
    thread_local const unsigned slot = threads++ % 64;
    char subdir_buf[16];
    std::snprintf(subdir_buf, sizeof subdir_buf, "w%u/", slot);
    const std::string subdir = subdir_buf;
    if (!m_subdir_made[slot].load(std::memory_order_acquire)) {
        std::string d = subdir.substr(0, subdir.size() - 1);
        if (io::mkdirat(m_temp.get(), d.c_str(), 0700) != 0 && errno != EEXIST)
            util::throw_errno("cannot create directory", m_temp_path + "/" + d);
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
        int fd = io::openat_create(m_temp.get(), name.c_str(), flags, 0444);
        if (fd < 0 && errno == EINVAL && direct) { // tmpfs and others refuse O_DIRECT: remember, go buffered
            m_no_direct.store(true, std::memory_order_relaxed);
            direct = false;
            fd = io::openat_create(m_temp.get(), name.c_str(), flags & ~O_DIRECT, 0444);
        }
        return fd;
    };
    int fd = open_it();
    if (fd < 0 && errno == ENOENT) { // publish() tidied the subdirectory away meanwhile
        io::mkdirat(m_temp.get(), subdir.substr(0, subdir.size() - 1).c_str(), 0700);
        m_subdir_made[slot].store(true, std::memory_order_release);
        fd = open_it();
    }
    if (fd < 0) util::throw_errno("cannot create temp file", m_temp_path + "/" + name);
    return TempFile(m_temp.get(), std::move(name), util::Fd(fd), direct);
}

StageResult ObjectStore::stage(const hash::Digest& d, TempFile&& tmp, std::uint64_t size) {
    return stage_checked(d, std::move(tmp), size, DiskChecked::no);
}

StageResult ObjectStore::stage_checked(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, DiskChecked checked) {
    // Objects are never writable: create_temp() made the file 0444 before it got any name.
    if (checked == DiskChecked::no && exists(d)) return StageResult::already_present; // tmp's destructor unlinks it
    std::lock_guard lk(m_mutex);
    // Re-check under the lock: another thread may have staged the same content meanwhile.
    if (m_staged.count(d)) return StageResult::already_present;
    m_staged.emplace(d, tmp.release());
    m_staged_bytes += size;
    return StageResult::staged;
}

StageResult ObjectStore::stage_bytes(const hash::Digest& d, std::string_view data) {
    if (exists(d)) return StageResult::already_present;
    TempFile t = create_temp(data.size());
    t.append(data.data(), data.size());
    return stage_checked(d, std::move(t), data.size(), DiskChecked::yes); // exists() just looked
}

size_t ObjectStore::staged_count() const {
    std::lock_guard lk(m_mutex);
    return m_staged.size();
}

PublishStats ObjectStore::publish() {
    // Snapshot what is staged now; the entries stay in m_staged (visible to exists() and stage(), so
    // nobody writes the same content again meanwhile) until they are under objects/.
    std::vector<std::pair<hash::Digest, std::string>> batch;
    std::uint64_t bytes;
    {
        std::lock_guard lk(m_mutex);
        batch.reserve(m_staged.size());
        for (auto& [d, name] : m_staged)
            if (!name.empty()) batch.emplace_back(d, std::exchange(name, std::string())); // "" = being published
        bytes = std::exchange(m_staged_bytes, 0);
    }
    struct Forget {
        ObjectStore& s;
        std::vector<std::pair<hash::Digest, std::string>>& b;
        ~Forget() {
            std::lock_guard lk(s.m_mutex);
            for (auto& [d, n] : b) {
                s.m_staged.erase(d);
                if (s.m_trusting) s.m_published.insert(d);
            }
        }
    } forget{*this, batch};
    PublishStats stats;
    if (batch.empty()) return stats;
    // Step 2: every staged file's data reaches the disk before any of them gets an object name.
    sync_filesystem(m_temp.get(), m_temp_path);
    io::crash_point("publish.staged-durable");
    for (auto& [digest, tmpname] : batch) {
        io::crash_point("publish.rename");
        std::string rel = object_relpath(digest);
        int rc = io::renameat2(m_temp.get(), tmpname.c_str(), m_objects.get(), rel.c_str(), RENAME_NOREPLACE);
        if (rc != 0 && errno == EINVAL) {
            // Filesystems without RENAME_NOREPLACE: link() never replaces either.
            rc = io::linkat(m_temp.get(), tmpname.c_str(), m_objects.get(), rel.c_str(), 0);
            if (rc == 0) io::unlinkat(m_temp.get(), tmpname.c_str(), 0);
        }
        if (rc != 0) {
            if (errno == EEXIST) {
                io::unlinkat(m_temp.get(), tmpname.c_str(), 0);
                continue;
            }
            if (errno == ENOENT) {
                // The fan-out directory is missing (deleted by hand): recreate it and retry once.
                io::mkdirat(m_objects.get(), rel.substr(0, 2).c_str(), 0755);
                if (io::renameat2(m_temp.get(), tmpname.c_str(), m_objects.get(), rel.c_str(), RENAME_NOREPLACE) == 0) {
                    ++stats.objects;
                    continue;
                }
                if (errno == EEXIST) {
                    ::unlinkat(m_temp.get(), tmpname.c_str(), 0);
                    continue;
                }
            }
            util::throw_errno("cannot place object", m_objects_path + "/" + rel);
        }
        ++stats.objects;
    }
    stats.bytes = bytes;
    // Step 4: the new directory entries are durable before the catalog refers to them.
    io::crash_point("publish.renamed");
    sync_filesystem(m_objects.get(), m_objects_path);
    io::crash_point("publish.durable");
    tidy_temp();
    return stats;
}

void ObjectStore::tidy_temp() {
    // temp/ is empty after every completed run: remove the per-thread subdirectories that are empty
    // (a busy one fails with ENOTEMPTY and stays; create_temp() recreates a removed one).
    for (size_t i = 0; i < m_subdir_made.size(); ++i) {
        if (!m_subdir_made[i].load()) continue;
        char d[16];
        std::snprintf(d, sizeof d, "w%zu", i);
        if (::unlinkat(m_temp.get(), d, AT_REMOVEDIR) == 0) m_subdir_made[i].store(false);
    }
}

ObjectStore::~ObjectStore() { tidy_temp(); }

size_t ObjectStore::discard_staged(const std::function<bool(const hash::Digest&)>& keep) {
    size_t removed = 0;
    std::unordered_set<std::string> kept;
    {
        std::lock_guard lk(m_mutex);
        for (auto it = m_staged.begin(); it != m_staged.end();) {
            if (!it->second.empty() && keep && keep(it->first)) {
                kept.insert(it->second);
                ++it;
                continue;
            }
            // An empty name is an entry publish() took and did not place: its file, if any, is
            // found by the sweep below.
            if (!it->second.empty() && io::unlinkat(m_temp.get(), it->second.c_str(), 0) == 0) ++removed;
            it = m_staged.erase(it);
        }
    }
    // Files of this process that a failed publish() (or a failed stage) left in its subdirectories.
    const std::string mine = std::string(k_temp_marker) + std::to_string(::getpid()) + "-";
    for (size_t i = 0; i < m_subdir_made.size(); ++i) {
        if (!m_subdir_made[i].load()) continue;
        char d[16];
        std::snprintf(d, sizeof d, "w%zu", i);
        int fd = ::openat(m_temp.get(), d, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) continue;
        util::Fd dir(fd);
        std::vector<std::string> names;
        try {
            names = util::list_dir(dir.get(), m_temp_path + "/" + d);
        } catch (const util::Error&) {
            continue; // dropped on purpose: the next locked run's sweep removes what is left
        }
        for (const auto& n : names)
            if (n.rfind(mine, 0) == 0 && !kept.count(std::string(d) + "/" + n) &&
                io::unlinkat(dir.get(), n.c_str(), 0) == 0)
                ++removed;
    }
    tidy_temp();
    return removed;
}

util::Fd ObjectStore::open(const hash::Digest& d) const {
    std::string rel = object_relpath(d);
    int fd = ::openat(m_objects.get(), rel.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) util::throw_errno("cannot open object", m_objects_path + "/" + rel);
    return util::Fd(fd);
}

void ObjectStore::remove_stale_temp() {
    std::vector<std::string> names = util::list_dir(m_temp.get(), m_temp_path);
    // Everything in temp/ belongs to a run that is over: we hold the store lock.
    for (const auto& n : names) util::remove_tree_at(m_temp.get(), n, m_temp_path + "/" + util::printable(n));
}

std::vector<std::string> ObjectStore::list_files() const {
    std::vector<std::string> out;
    std::vector<std::string> fan;
    for (const auto& n : util::list_dir(m_objects.get(), m_objects_path)) {
        if (n.size() == 2 && std::isxdigit(static_cast<unsigned char>(n[0])) && std::isxdigit(static_cast<unsigned char>(n[1])))
            fan.push_back(n);
    }
    for (const auto& f : fan) {
        int fd = ::openat(m_objects.get(), f.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) continue;
        DIR* d = ::fdopendir(fd);
        if (!d) {
            ::close(fd);
            continue;
        }
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n != "." && n != "..") out.push_back(f + "/" + n);
        }
        ::closedir(d);
    }
    return out;
}

} // namespace casmig::cas
