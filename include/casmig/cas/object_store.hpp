// casmig::cas — the content-addressed object store under <store>/objects/.
//
// On-disk format
//   objects/<2 hex>/<62 hex>   one regular file per distinct content, named by the lowercase hex of the
//                              BLAKE3-256 of its uncompressed bytes (first byte's two hex digits are the
//                              fan-out directory, the other 31 bytes the file name); stored verbatim
//                              (uncompressed), mode 0444, never rewritten once it exists.
//   Objects are sparse where the content is zero (docs/design.md, "Sparse files"): every k_sparse_block
//   bytes long, k_sparse_block-aligned block of an object that is all zeros — a hole of the legacy
//   file (SEEK_DATA/SEEK_HOLE) or a zero run written out — is left a hole, and an object that ends in
//   a hole has its last byte written to give it its size. Holes read as zeros: the name, the hash and
//   every reader are unchanged.
//   objects/<2 hex>/<62 hex>.zst   the same content as one zstd frame (the zstd store mode: the format,
//                              the threshold and the dictionary are in cas/compression.hpp). One form per
//                              digest is the normal state; every reader goes through open_content(),
//                              which accepts either (raw first).
//   A variant of one content keeps the 64 hex digits as its name's start: "<62 hex>.m<octal>" is a
//   read-only twin with other read/exec bits for materialize --link hardlink (mode <octal> without
//   write bits). All 256 fan-out directories (mode 0755, owned like objects/) are created with the
//   store. migration/corrupt/<64 hex>[suffix].<n>: files found at an object's name that were not the
//   object (see quarantine()).
//
// Durability policy (the one place it is written down)
//   Objects are staged, then published in batches, the way OSTree commits:
//     1. each new object is written to an unnamed file (O_TMPFILE) in temp/casmig-<pid>-<rand>/ (this
//        process's own staging directory, see "temp/" below), created mode 0444, kept open (no
//        fsync); or, where the filesystem has no O_TMPFILE or too many are open already
//        (create_staging_temp()), to a named one, w<N>/tmp-casmig-<pid>-<n>, closed. Objects of
//        k_direct_min bytes or more bypass the page cache (O_DIRECT), except for the unaligned tail;
//     2. publish(): one syncfs() of the store's filesystem makes every staged file's data durable
//        (buffered data is written back; the device cache, holding O_DIRECT data, is flushed);
//     3. each staged file gets its object name: an unnamed one by linkat() of its fd (link never
//        replaces), a named one by rename with RENAME_NOREPLACE. EEXIST: a file already sits
//        at the name. If the name is known good (listed by trust_catalog(), or placed or checked by
//        this process) it is kept and the temp file dropped; otherwise it is checked, size then
//        BLAKE3 of its content, and a file that is not the object (planted, damaged, a symlink) is
//        moved to migration/corrupt/ (never deleted; publish() returns it) and the staged copy takes
//        the name — an object name never points at unsynced or unchecked data;
//     4. a second syncfs() makes the renames (the fan-out directory entries) durable;
//     5. only then does the caller commit catalog rows that refer to these objects.
//   A crash before 3 leaves nothing of an unnamed file (the filesystem frees it with the process's
//   fds, or at mount after a power loss) and named temp files to the next locked run (their owner's
//   lock is free); between 3 and 4 an object may or may not exist, but if it exists its content is complete
//   and synced; before 5 the catalog does not refer to it (gc removes orphans, a rerun finds the object,
//   checks its content and skips the write).
//   One syncfs per batch instead of one fsync per object is what makes migrate faster than `cp -a`.
//   Nothing turns syncing off; tests run with it, on small stores it costs milliseconds.
//
// Trust: nothing is trusted because it sits at an object's name. exists() answers "present" for a
// file under objects/ only once its content has been checked in this process (or the catalog lists
// it, after trust_catalog()); a failed publish() leaves no digest it did not place known.
// Objects are mode 0444, fan-out directories 0755 (verify --objects puts them right).
//
// temp/ (the store's staging directory) is casmig's alone. It is opened without following a symlink:
// a symlink or non-directory at temp/ is refused (util::RefusedError), its target never touched.
// Each ObjectStore that writes temp files creates its own directory temp/casmig-<pid>-<16 hex>/ on
// first use, holding a file "lock" that it flock()s for as long as it lives (materialize, which does
// not take the store lock, included); the directory is removed by the destructor. sweep_temp()
// removes only such directories whose lock it can take (the owner is dead); entries named trash-* and
// rollback-* directly in temp/ belong to the lifecycle commands (cleanup, remove, rollback), which
// recover them from their journal, and are never touched here; anything else is foreign, left alone
// and named in the result.
//
// Thread safety: exists(), stage_*(), create_temp() and open() may be called from many threads;
// publish() and sweep_temp() are called by one thread (the pipeline's serial stage or a command).
#pragma once
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <sys/types.h>
#include <unordered_map>
#include <utility>
#include <unordered_set>
#include <vector>

#include "casmig/cas/compression.hpp"
#include "casmig/hash/blake3.hpp"
#include "casmig/hash/digest_filter.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::cas {

/// "ab/cdef…" (62 hex) — the object's path relative to objects/.
std::string object_relpath(const hash::Digest& d);
/// The path of the object's file in `form` ("ab/cdef…" or "ab/cdef….zst").
std::string object_relpath(const hash::Digest& d, Form form);
/// Marker every temp file name starts with, so leftovers from a crash are recognisable.
inline constexpr const char* k_temp_marker = "tmp-casmig-";
/// Marker of a process's own staging directory in temp/: "casmig-<pid>-<16 hex>".
inline constexpr const char* k_temp_dir_marker = "casmig-";
/// Name of the flock()ed file inside a staging directory; free once its owner is dead.
inline constexpr const char* k_temp_lock_name = "lock";
/// Where publish() moves a file that sat at an object's name but was not the object, relative to
/// the store root.
inline constexpr const char* k_quarantine_dir = "migration/corrupt";

/// Objects at least this large are written with O_DIRECT (see TempFile::append()).
inline constexpr std::uint64_t k_direct_min = 64 * 1024;

/// Holes in objects: an all-zero block of this size at an offset that is a multiple of it is not
/// written (see TempFile::append_sparse()). 64 KiB: large enough that a file's scattered zero pages do
/// not fragment its object, small enough to catch every zero run a disk image or a core dump has.
inline constexpr std::uint64_t k_sparse_block = 64 * 1024;

/// A temp file being written in temp/; unlinked in the destructor unless handed to stage(). An
/// anonymous one (O_TMPFILE, ObjectStore::create_staging_temp()) has no name at all: it is gone with
/// its fd, and publish() links it into objects/ by its fd.
class TempFile {
public:
    struct Anonymous {};
    TempFile() = default;
    TempFile(int temp_dirfd, std::string name, util::Fd fd, bool direct = false)
        : m_dirfd(temp_dirfd), m_name(std::move(name)), m_fd(std::move(fd)), m_direct(direct) {}
    TempFile(Anonymous, int temp_dirfd, util::Fd fd, bool direct)
        : m_dirfd(temp_dirfd), m_fd(std::move(fd)), m_direct(direct), m_anonymous(true) {}
    TempFile(TempFile&& o) noexcept;
    TempFile& operator=(TempFile&& o) noexcept;
    ~TempFile();
    int fd() const { return m_fd.get(); }
    /// The directory the name is relative to (the owning ObjectStore's staging directory).
    int dirfd() const { return m_dirfd; }
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
    /// append(), except that each k_sparse_block-aligned block of k_sparse_block zero bytes is left a
    /// hole (not written: the file offset moves past it). The write path of objects; call finish()
    /// before the file is published (ObjectStore::stage() does).
    void append_sparse(const char* data, size_t len);
    /// Appends len zero bytes as a hole (nothing is written): a hole of the legacy file being ingested.
    void append_hole(std::uint64_t len);
    /// Bytes appended so far (holes included): the file's size once finish() ran.
    std::uint64_t size() const { return m_size; }
    /// A file that ends in a hole gets its size: its last byte (a zero) is written (through the I/O
    /// seam, so the power-cut model sees it). Idempotent. Throws util::SystemError.
    void finish();
    /// Closes the fd and gives up ownership of the name (it is now the store's to publish).
    std::string release();
    /// True for an unnamed (O_TMPFILE) file: name() is empty and only its fd keeps it.
    bool anonymous() const { return m_anonymous; }
    /// An anonymous file's fd, handed over (the file lives as long as it stays open).
    util::Fd release_anonymous();
    /// A new read-only fd of the file (by name, or through /proc/self/fd for an anonymous one).
    util::Fd reopen_read() const;
    /// "temp/<name>", or "temp/(unnamed file)" for an anonymous one: for messages.
    std::string display() const;

private:
    int m_dirfd = -1;
    std::string m_name;
    util::Fd m_fd;
    bool m_direct = false;
    bool m_anonymous = false;
    std::uint64_t m_size = 0; // logical size: bytes and holes appended
    std::uint64_t m_end = 0;  // end of the last byte written (the file's size before finish())
    void stop_direct();
    /// Writes at offset m_size (seeking past a hole first) and advances both offsets.
    void write_data(const char* data, size_t len);
    /// Closes the fd and unlinks the file if this object still owns a name; leaves an empty TempFile.
    void discard() noexcept;
};

enum class StageResult { staged, already_present };

/// A file found at an object's name that was not the object; moved aside, never deleted.
struct Quarantined {
    hash::Digest digest;
    std::string moved_to; // relative to the store root: "migration/corrupt/<64 hex>.<n>"
    std::string why;      // "has 12 bytes, expected 40", "content hashes to …", "is a symlink"
};

struct PublishStats {
    std::uint64_t objects = 0; // newly placed under objects/
    std::uint64_t bytes = 0;
    std::vector<Quarantined> quarantined; // files that sat at a name and were replaced by the object
    /// The filesystem was synced (syncfs) before any object was named: whatever was written to the store
    /// before publish() began (a batch's staged manifests) is durable too.
    bool synced_staged = false;
};

/// What sweep_temp() did.
struct TempSweep {
    std::uint64_t removed = 0;        // staging directories of dead processes removed
    std::vector<std::string> foreign; // names directly in temp/ that casmig did not make (left alone)
};

class ObjectStore {
public:
    /// objects_dir and temp_dir must exist on the same filesystem (Store creates them); the
    /// quarantine directory is k_quarantine_dir beside objects_dir (created when first needed). temp_dir
    /// is opened without following a symlink in its last component: a symlink or a non-directory there
    /// throws util::RefusedError (the target is never touched). Creates nothing.
    ObjectStore(const std::string& objects_dir, const std::string& temp_dir);

    const std::string& dir() const { return m_objects_path; }
    int dirfd() const { return m_objects.get(); }
    /// temp/ itself: for the lifecycle's trash-<id> and rollback-<id> entries, which sweep_temp()
    /// never touches. Object staging does not use it (see own_temp_dirfd()).
    int temp_dirfd() const { return m_temp.get(); }
    /// This ObjectStore's own staging directory temp/casmig-<pid>-<16 hex>/ (created and locked on
    /// first use, removed with everything in it by the destructor). Throws util::SystemError.
    int own_temp_dirfd();
    /// Its name relative to temp/ ("" until created).
    std::string own_temp_name() const;

    /// True if the object is staged in this process, or known good: listed by trust_catalog(), placed
    /// by this process, or found under objects/ and checked (size, then content) in this process.
    /// After trust_catalog(), a digest the catalog does not list is not looked up on disk (publish()
    /// checks what it finds there). size, when known, is checked before the content is hashed.
    bool exists(const hash::Digest& d, std::optional<std::uint64_t> size = std::nullopt) const;
    /// Makes exists() answer from the catalog (`cataloged`: does its objects table list d? rows are
    /// committed only once their objects are durable) plus what this process staged and published,
    /// with no syscall per file. `cataloged` is called from the calling threads, without this store's
    /// lock held, and must be thread-safe; it is asked per digest, so that memory does not grow with
    /// the store (issue 9: no command loads the whole objects table). An object deleted behind the
    /// catalog's back is then not rewritten: verify finds it missing and drops its catalog row, so the
    /// next migrate of a package that holds the content writes it again.
    ///
    /// nothing_cataloged: the catalog's objects table was empty when this run began (a first migration)
    /// and only this process adds to it. Then a digest forget_cataloged() was never told about is not
    /// in the catalog, and exists() says so without asking `cataloged` (a DigestFilter of 1 MiB holds
    /// what was forgotten; its "maybe" is asked of the catalog as before). Wrong only towards "absent"
    /// if someone else catalogs objects meanwhile: the content is staged again and publish() keeps the
    /// copy it finds, after checking it.
    void trust_catalog(std::function<bool(const hash::Digest&)> cataloged, bool nothing_cataloged = false);
    /// Drops what this process remembers of objects the catalog now lists (their rows are committed):
    /// after trust_catalog() the catalog answers for them, so memory stays bounded by what is in flight.
    void forget_cataloged(const std::vector<hash::Digest>& digests);
    /// True only if the object is under objects/ in either form (a regular file); size gets its
    /// uncompressed size (a raw file's size, a .zst frame header's content size; UINT64_MAX if that
    /// header is unreadable, so that any size check fails). Does not read the content.
    bool on_disk(const hash::Digest& d, std::uint64_t* size = nullptr) const;
    /// True if the object is where and as big as the catalog says: its raw form of `size` bytes when
    /// stored_size == size, else its .zst form of stored_size bytes (a regular file either way). One
    /// lstat, no open: what verify asks of every object a manifest needs once the catalog has its row.
    /// False is no verdict (the other form, a convert in between, a missing file): ask on_disk().
    bool has_stored(const hash::Digest& d, std::uint64_t size, std::uint64_t stored_size) const;
    /// The form the object is on disk in (raw when both are), nullopt if neither file is there.
    std::optional<Form> form_on_disk(const hash::Digest& d) const;

    /// THE read path: opens the object in whichever form it is stored (raw first) and returns a reader
    /// of its uncompressed bytes. Throws util::SystemError (ENOENT when neither form exists).
    ObjectReader open_content(const hash::Digest& d) const;
    /// A reader of the file objects/<rel> (raw or ".zst" by its name; other variants are raw), opened
    /// without following a symlink. Throws util::SystemError.
    ObjectReader open_file(const std::string& rel) const;
    /// The store's dictionaries (packages/dict/ beside objects/).
    const Dictionaries& dictionaries() const { return m_dicts; }

    /// Writes a zstd dictionary durably to packages/dict/<64 hex BLAKE3 of bytes> and returns that digest:
    /// a temp file in this process's staging directory, fsync, packages/dict/ created (and packages/
    /// fsynced) if missing, renamed into place without replacing, then packages/dict/ fsynced (crash
    /// points <command>.dict-staged, <command>.dict-renamed, <command>.dict-written). A file already at
    /// the name that hashes to it is kept; one that does not is moved to migration/corrupt/ first.
    /// Throws util::SystemError.
    hash::Digest store_dictionary(std::string_view bytes, const std::string& command = "migrate");
    /// Compress new objects (zstd store mode) with c; nullptr: store them raw. Call before staging.
    void set_compressor(std::shared_ptr<const Compressor> c) { m_compressor = std::move(c); }
    const Compressor* compressor() const { return m_compressor.get(); }
    /// Bytes the object takes under objects/, if this process placed it or checked it there.
    std::optional<std::uint64_t> stored_size(const hash::Digest& d) const;

    /// A new, empty, writable temp file in temp/. size_hint ≥ k_direct_min opens it with O_DIRECT where
    /// the filesystem supports it.
    TempFile create_temp(std::uint64_t size_hint = 0);
    /// create_temp() for a file that is only ever handed to stage() (or dropped): an unnamed O_TMPFILE
    /// file in this process's staging directory where the filesystem has them, /proc/self/fd is there,
    /// a probe file could be linked (probe_unnamed_link()), and fewer than an eighth of RLIMIT_NOFILE
    /// staged files are held open this way;
    /// otherwise a named one. Unnamed, a staged file costs no directory entry in temp/ and no rename
    /// (publish() links it into objects/), and a crash leaves nothing of it behind.
    TempFile create_staging_temp(std::uint64_t size_hint = 0);
    /// Hands a completely written temp file over for publication under digest d. If d is already
    /// present or staged, the temp file is removed and already_present is returned (dedup). size: the
    /// uncompressed size; a Form::zstd file is one frame of `stored` bytes, published as "<name>.zst".
    StageResult stage(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, Form form = Form::raw,
                      std::uint64_t stored = 0);
    /// Writes data to a temp file and stages it (no-op if present); with a compressor set, the data is
    /// compressed here (by the calling thread: the pipeline's parallel stage) and staged as .zst when
    /// worth_compressing() says so.
    StageResult stage_bytes(const hash::Digest& d, std::string_view data);
    /// With a compressor set: a temp file holding data as one frame, if worth_compressing() says the
    /// frame is worth keeping; otherwise (or without a compressor) nullopt and nothing written.
    std::optional<TempFile> compressed_temp(std::string_view data);
    /// Stages d in another form than the one on disk (convert): unlike stage(), a file of the other
    /// form at d's name does not make it "present". publish() places it beside that file; a file
    /// already at this form's name is proven (size, content) and kept, or quarantined and replaced.
    /// Call only for digests exists() was not asked about in this process (it would trust them).
    void stage_other_form(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, Form form, std::uint64_t stored);
    /// Proves the file of one form at d's name: "" if it is a regular file whose content (decoded, for
    /// .zst) has `size` bytes, if known, and hashes to d; otherwise why not ("is missing", "content hashes
    /// to …", the decoder's complaint). Throws util::SystemError if it cannot be read.
    std::string prove_form(const hash::Digest& d, std::optional<std::uint64_t> size, Form form) const;

    /// Makes every staged object durable and visible (see the durability policy above). A file found
    /// at a name that is not the object is moved to k_quarantine_dir and returned in the stats (the
    /// caller journals and reports it). On failure (throws util::SystemError), the staged files of the
    /// batch that were not placed are removed and their digests are not known.
    PublishStats publish();
    /// Number of objects staged and not yet published.
    size_t staged_count() const;

    /// Removes the staging directories of dead casmig processes from temp/ (their lock is free), never
    /// a live one's, never trash-* or rollback-* (the lifecycle's), never a foreign entry (returned).
    /// Safe to call while other casmig processes write temp files. Throws util::SystemError.
    TempSweep sweep_temp();
    /// Removes this process's empty per-thread staging subdirectories.
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
    /// The same names, one fan-out directory at a time (objects/00/ … objects/ff/, in that order): f
    /// gets each directory's names, so memory stays one shard's names, not the store's. Same error
    /// policy as list_files(): a fan-out directory that cannot be read throws util::SystemError.
    void for_each_shard(const std::function<void(const std::vector<std::string>&)>& f) const;
    /// Moves objects/<rel> (not followed if a symlink) into the quarantine directory under a name that
    /// replaces nothing ("<64 hex>[suffix].<n>"); returns that name relative to the store root. Never
    /// deletes. Throws util::SystemError.
    std::string quarantine(const std::string& rel);

private:
    enum class DiskChecked { no, yes };
    struct Staged {
        std::string name; // relative to the own staging directory; "" if anonymous
        util::Fd fd;      // an anonymous file's only reference
        bool publishing = false;
        std::uint64_t size = 0;
        Form form = Form::raw;
        std::uint64_t stored = 0;
    };
    StageResult stage_checked(const hash::Digest& d, TempFile&& tmp, std::uint64_t size, DiskChecked checked,
                              Form form, std::uint64_t stored);
    /// Why the file at d's name is not the object: nullopt if nothing is there, "" if it is the object
    /// (a regular file of the right size, if known, whose content hashes to d; its mode is set to 0444).
    /// Throws util::SystemError if it cannot be read.
    /// Looks at the file of the given form only.
    std::optional<std::string> check_on_disk(const hash::Digest& d, std::optional<std::uint64_t> size, Form form) const;
    /// Places one staged file at d's name (step 3). Returns true if this call placed it.
    bool place(const hash::Digest& d, const std::string& tmpname, int anon_fd, std::uint64_t size, Form form,
               PublishStats& stats);
    void remove_own_temp() noexcept;
    /// Whether an unnamed file made here can be given a name (linkat by fd, or by /proc/self/fd): tried
    /// once on a probe file; m_no_empty_path is set if only /proc works.
    bool probe_unnamed_link(int own) noexcept;
    std::string m_objects_path, m_temp_path, m_quarantine_path, m_packages_path;
    util::Fd m_objects, m_temp;
    mutable std::mutex m_own_mutex;
    util::Fd m_own, m_own_lock; // own staging directory and its flock()ed lock file
    std::string m_own_name;
    std::atomic<int> m_own_fd{-1}; // m_own's fd once created: create_temp() reads it without the mutex
    mutable std::mutex m_mutex;
    std::unordered_map<hash::Digest, Staged, hash::DigestHash> m_staged;
    bool m_trusting = false;
    std::array<std::atomic<bool>, 64> m_subdir_made{}; // <own staging directory>/w<N>/ exists
    std::atomic<bool> m_no_direct{false};               // the filesystem refused O_DIRECT once
    std::atomic<bool> m_no_anonymous{false};            // no O_TMPFILE (or no /proc/self/fd) here
    std::atomic<bool> m_no_empty_path{false};           // linkat(AT_EMPTY_PATH) refused: /proc/self/fd
    std::atomic<size_t> m_staged_anonymous{0};          // anonymous files in m_staged (open fds)
    std::once_flag m_anonymous_once;                    // the budget below computed, linking probed
    std::atomic<size_t> m_anonymous_budget{SIZE_MAX};   // at most this many unnamed staged files
    std::function<bool(const hash::Digest&)> m_cataloged; // set by trust_catalog()
    std::shared_ptr<hash::DigestFilter> m_forgotten;      // trust_catalog(..., true): what forget_cataloged() dropped
    /// m_cataloged(d), unless forgotten (m_forgotten, read under m_mutex) says this run never cataloged d.
    bool cataloged(const hash::Digest& d, const hash::DigestFilter* forgotten) const;
    // Placed by publish() (once durable) or found on disk and checked by this process; m_mutex.
    mutable std::unordered_set<hash::Digest, hash::DigestHash> m_good;
    std::uint64_t m_staged_bytes = 0;
    std::optional<std::pair<uid_t, gid_t>> m_owner; // objects/'s owner, when root creates objects for another
    Dictionaries m_dicts;
    std::shared_ptr<const Compressor> m_compressor;
    mutable std::unordered_map<hash::Digest, std::uint64_t, hash::DigestHash> m_stored; // m_mutex
};

/// syncfs() the filesystem holding fd; throws SystemError naming `display`.
void sync_filesystem(int fd, const std::string& display);

} // namespace casmig::cas
