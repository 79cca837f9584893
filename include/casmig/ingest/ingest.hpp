// casmig::ingest — reading legacy files: open safely, hash, optionally store, detect change.
// Shared by migrate (and plan), verify and the zstd dictionary's sample; it depends on walk and cas,
// never on the commands that use it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "casmig/cas/object_store.hpp"
#include "casmig/hash/blake3.hpp"
#include "casmig/util/rate_limiter.hpp"
#include "casmig/walk/walker.hpp"

namespace casmig::ingest {

enum class StoreObject { no, yes };

struct IngestResult {
    hash::Digest digest;
    std::uint64_t size = 0;
    bool new_object = false; // staged by this call
    std::string xattrs;      // encoded extended attributes (util/xattr.hpp), "" if none
};

/// Opens item.name relative to item.parent with O_NOFOLLOW, checks it is the inode the walker saw,
/// streams it through BLAKE3 in fixed buffers and — with StoreObject::yes — into a temp file that is
/// staged in `objects` under its digest unless the object exists. The bytes hashed are exactly the
/// bytes stored. Size, mtime and ctime are compared before and after the read: a file that changed
/// throws walk::PackageError naming the path, as does any read error.
/// `pkg_display` prefixes nothing; the caller adds the package. Thread-safe.
IngestResult ingest_file(const walk::Item& item, cas::ObjectStore* objects, StoreObject store,
                         util::RateLimiter* limiter);

/// The open ingest_file() does: O_NOFOLLOW|O_NONBLOCK (and O_NOATIME where allowed), relative to the
/// item's directory fd. Throws walk::PackageError naming the path.
util::Fd open_item(const walk::Item& item);
/// open_item() for read-ahead: an empty Fd instead of an error (the caller then opens the file with
/// open_item(), which names the problem). Never throws.
util::Fd try_open_item(const walk::Item& item) noexcept;
/// How many files each of `holders` threads may keep open for read-ahead at once: at most 256, and
/// together at most half of RLIMIT_NOFILE, so that read-ahead never makes an open fail with EMFILE.
size_t read_ahead_files(unsigned holders);
/// How many distinct directories the walked items each of `holders` keeps (walk::Item::parent holds its
/// directory open) may reference at once: together at most an eighth of RLIMIT_NOFILE, at least 1. In
/// a deep tree nearly every file has a directory of its own, so this, not the file count, bounds fds.
size_t dir_refs_per_holder(unsigned holders);
/// Starts reading the first few MiB of an open file into the page cache and returns at once, so that
/// the disk works on many files while the caller hashes them one by one. A hint: errors are ignored.
void prefetch(int fd, std::uint64_t size);
/// Pass 1 of a grouped read: opens (try_open_item) up to `budget` of the n items for which item_at(i)
/// returns an item (nullptr: skip i) and starts their read-ahead; the other fds stay empty. The caller
/// then reads them in order, opening an empty one with open_item(), which reports the problem. On a
/// cold cache the disk gets a whole group at once instead of one small read per reading thread.
template <class ItemAt>
std::vector<util::Fd> open_ahead(size_t n, size_t budget, ItemAt item_at) {
    std::vector<util::Fd> fds(n);
    for (size_t i = 0, opened = 0; i < n && opened < budget; ++i) {
        const walk::Item* it = item_at(i);
        if (!it) continue;
        fds[i] = try_open_item(*it);
        if (!fds[i]) continue;
        prefetch(fds[i].get(), it->entry.size);
        ++opened;
    }
    return fds;
}

/// ingest_file() on a file open_item() opened.
IngestResult ingest_open(const walk::Item& item, util::Fd fd, cas::ObjectStore* objects, StoreObject store,
                         util::RateLimiter* limiter);

/// Same open/hash/change-detection, hash only (verify, plan).
inline IngestResult hash_file(const walk::Item& item, util::RateLimiter* limiter = nullptr) {
    return ingest_file(item, nullptr, StoreObject::no, limiter);
}

} // namespace casmig::ingest
