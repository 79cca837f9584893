// casmig::cas — the content-addressed object store under <store>/objects/.
//
// On-disk format
//   objects/<2 hex>/<62 hex>   one regular file per distinct content, named by the lowercase hex of the
//                              BLAKE3-256 of its uncompressed bytes (first byte's two hex digits are the
//                              fan-out directory, the other 31 bytes the file name); stored verbatim
//                              (uncompressed), mode 0444, never rewritten once it exists.
//   A variant of one content (an executable twin for hard-link use, "<62 hex>.x", mode 0555) keeps the
//   64 hex digits as its name's start. All 256 fan-out directories are created with the store.
//
// Durability policy (the one place it is written down)
//   Objects are staged, then published in batches, the way OSTree commits:
//     1. each new object is written to temp/w<N>/tmp-casmig-<pid>-<n>, created mode 0444, closed (no
//        fsync); objects of k_direct_min bytes or more bypass the page cache (O_DIRECT), except for the
//        unaligned tail;
//     2. publish(): one syncfs() of the store's filesystem makes every staged file's data durable
//        (buffered data is written back; the device cache, holding O_DIRECT data, is flushed);
//     3. each staged file is renamed into objects/ with RENAME_NOREPLACE (EEXIST: the content is
//        already there, the temp file is dropped) — an object name never points at unsynced data;
//     4. a second syncfs() makes the renames (the fan-out directory entries) durable;
//     5. only then does the caller commit catalog rows that refer to these objects.
//   A crash before 3 leaves only temp files (removed at the start of the next locked run); between 3
//   and 4 an object may or may not exist, but if it exists its content is complete and synced; before 5
//   the catalog does not refer to it (gc removes orphans, a rerun finds the object and skips the write).
//   One syncfs per batch instead of one fsync per object is what makes migrate faster than `cp -a`.
//   Nothing turns syncing off; tests run with it, on small stores it costs milliseconds.
//
// Thread safety: exists(), stage_*() and open() may be called from many threads; publish() and
// remove_stale_temp() are called by one thread (the pipeline's serial stage or a command), under the
// store lock.
#pragma once
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "casmig/hash/blake3.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::cas {

/// "ab/cdef…" (62 hex) — the object's path relative to objects/.
std::string object_relpath(const hash::Digest& d);
/// Marker every temp file name starts with, so leftovers from a crash are recognisable.
inline constexpr const char* k_temp_marker = "tmp-casmig-";

/// Objects at least this large are written with O_DIRECT (see TempFile::append()).
inline constexpr std::uint64_t k_direct_min = 64 * 1024;

/// A temp file being written in temp/; unlinked in the destructor unless handed to stage().
class TempFile {
public:
    TempFile() = default;
    TempFile(int temp_dirfd, std::string name, util::Fd fd, bool direct = false)
        : m_dirfd(temp_dirfd), m_name(std::move(name)), m_fd(std::move(fd)), m_direct(direct) {}
    TempFile(TempFile&& o) noexcept;
    TempFile& operator=(TempFile&& o) noexcept;
    ~TempFile();
    int fd() const { return m_fd.get(); }
    const std::string& name() const { return m_name; }
    /// True while the file is open with O_DIRECT.
    bool direct() const { return m_direct; }
    /// Appends len bytes. With O_DIRECT (create_temp() chose it for a large object), a write whose
    /// buffer start and length are multiples of util::k_direct_align goes straight to the disk: migrate
    /// writes each object once and does not read it back soon, and on a VM filling fresh page-cache
    /// pages costs more than the disk write (docs/benchmarks.md). Anything unaligned — the tail of the
    /// file, or a filesystem that refuses O_DIRECT at write time — switches the file to buffered
    /// writes for good, so every byte is written either way. Durability is unchanged: publish()'s
    /// syncfs() flushes the device cache and the buffered tail alike. Throws util::SystemError.
    void append(const char* data, size_t len);
    /// Closes the fd and gives up ownership of the name (it is now the store's to publish).
    std::string release();

private:
    int m_dirfd = -1;
    std::string m_name;
    util::Fd m_fd;
    bool m_direct = false;
    void stop_direct();
};

enum class StageResult { staged, already_present };

struct PublishStats {
    std::uint64_t objects = 0; // newly placed under objects/
    std::uint64_t bytes = 0;
};

class ObjectStore {
public:
    /// objects_dir and temp_dir must exist on the same filesystem (Store creates them).
    ObjectStore(const std::string& objects_dir, const std::string& temp_dir);

    const std::string& dir() const { return m_objects_path; }
    int dirfd() const { return m_objects.get(); }
    int temp_dirfd() const { return m_temp.get(); }

    /// True if the object is under objects/ or staged in this process (not yet published). After
    /// trust_catalog(), answers from memory without touching the disk.
    bool exists(const hash::Digest& d) const;
    /// Makes exists() answer from the digests the catalog lists (committed only once durable) plus
    /// what this process staged and published, with no syscall per file. An object deleted behind the
    /// catalog's back is then not rewritten: verify finds it missing and drops its catalog row, so the
    /// next migrate of a package that holds the content writes it again.
    void trust_catalog(std::vector<hash::Digest> known);
    /// True only if the object is under objects/; size gets its on-disk size.
    bool on_disk(const hash::Digest& d, std::uint64_t* size = nullptr) const;

    /// A new, empty, writable temp file in temp/. size_hint ≥ k_direct_min opens it with O_DIRECT where
    /// the filesystem supports it.
    TempFile create_temp(std::uint64_t size_hint = 0);
    /// Hands a completely written temp file over for publication under digest d. If d is already
    /// present or staged, the temp file is removed and already_present is returned (dedup).
    StageResult stage(const hash::Digest& d, TempFile&& tmp, std::uint64_t size);
    /// Convenience: writes data to a temp file and stages it (no-op if present).
    StageResult stage_bytes(const hash::Digest& d, std::string_view data);

    /// Makes every staged object durable and visible (see the durability policy above).
    PublishStats publish();
    /// Number of objects staged and not yet published.
    size_t staged_count() const;

    /// Opens an object read-only; throws util::SystemError if it is missing.
    util::Fd open(const hash::Digest& d) const;
    /// Removes temp files left by a killed run. Caller holds the store lock.
    void remove_stale_temp();
    /// Removes this process's empty staging subdirectories of temp/.
    void tidy_temp();
    /// Disk full: deletes this process's staged, unpublished temp files except those whose digest
    /// `keep` answers true for (they stay staged for the next publish()), and this process's temp
    /// files that a failed publish() left behind. Call with no stage_*() or publish() running.
    /// Returns the number of files deleted. Never throws for a file that cannot be deleted (the next
    /// locked run removes it).
    size_t discard_staged(const std::function<bool(const hash::Digest&)>& keep);
    ~ObjectStore();
    /// Every object file name under objects/ (relative "ab/…"), variants included.
    std::vector<std::string> list_files() const;

private:
    enum class DiskChecked { no, yes };
    StageResult stage_checked(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, DiskChecked checked);
    std::string m_objects_path, m_temp_path;
    util::Fd m_objects, m_temp, m_store_fs; // m_store_fs: any fd on the store's filesystem, for syncfs
    mutable std::mutex m_mutex;
    std::unordered_map<hash::Digest, std::string, hash::DigestHash> m_staged; // digest -> temp name
    bool m_trusting = false;
    std::array<std::atomic<bool>, 64> m_subdir_made{}; // temp/w<N>/ exists
    std::atomic<bool> m_no_direct{false};               // the filesystem refused O_DIRECT once
    std::vector<hash::Digest> m_known;                                       // sorted
    std::unordered_set<hash::Digest, hash::DigestHash> m_published;          // by this process
    std::uint64_t m_staged_bytes = 0;
};

/// syncfs() the filesystem holding fd; throws SystemError naming `display`.
void sync_filesystem(int fd, const std::string& display);

} // namespace casmig::cas
