// casmig::manifest — what one package tree is: its entries, their canonical order, and the canonical,
// versioned byte encoding that the store keeps under packages/ (docs/format.md). Walk, catalog, verify,
// lifecycle and the packages/ writer share these types; this area depends on nothing but hash and util.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "casmig/hash/blake3.hpp"
#include "casmig/util/error.hpp"

namespace casmig::manifest {

enum class EntryType { file = 1, dir = 2, symlink = 3 };

/// One entry of a package tree. `path` is the byte path relative to the package root ("" is the root).
struct Entry {
    std::string path;
    EntryType type = EntryType::file;
    std::uint32_t mode = 0;          // the 07777 bits
    std::uint64_t size = 0;          // files: content bytes; symlinks: target length; dirs: 0
    std::optional<hash::Digest> digest; // files only
    std::string target;              // symlinks only: target bytes, verbatim
    std::int64_t mtime_ns = 0;
    std::uint32_t uid = 0, gid = 0;  // owner, restored when casmig runs as root
    std::optional<std::string> link_to; // files only: another path of this package that is the same inode
                                     // (after normalize(): the group's first path in path-byte order)
    std::string xattrs;              // files and dirs: extended attributes (util/xattr.hpp encoding), "" if none
    // files only: hard-link group across packages. Set, on every path of the inode, when the legacy
    // file had more links (st_nlink) than its package has paths to it; the same value in every package
    // that holds a name of that inode: a store-wide id derived from (st_dev, st_ino) at migrate time.
    // A hint, never trusted alone: rollback links two files of one group only after proving them equal.
    std::optional<std::int64_t> xlink; // never negative
};

/// A manifest object that does not decode: damaged, truncated, or not a manifest.
class FormatError : public util::Error {
public:
    using util::Error::Error;
};

/// A manifest of a format version this casmig does not read (a newer casmig wrote it): not damage.
class VersionError : public FormatError {
public:
    using FormatError::FormatError;
};

/// Current version of the encoding (docs/format.md); decode() reads this version only.
inline constexpr std::uint32_t k_format_version = 1;
/// Upper bounds decode() enforces before allocating (a damaged length never costs memory).
inline constexpr std::uint64_t k_max_path = 1u << 20;    // bytes of one path
inline constexpr std::uint64_t k_max_xattrs = 1u << 24;  // bytes of one entry's xattr record
/// Decoded paths together stay below k_max_decoded_paths_min + factor × the encoding's size.
inline constexpr std::uint64_t k_max_decoded_paths_min = std::uint64_t(256) << 20;
inline constexpr std::uint64_t k_max_decoded_paths_factor = 64;

/// True if a < b in the canonical order: plain byte order of the paths (memcmp, shorter first on a tie).
bool path_less(std::string_view a, std::string_view b);

/// Puts entries into canonical form: sorted by path bytes, and each hard-link group pointing at its
/// first path in that order (link_to of the leader empty, of the others that path). A walk records
/// link_to as the first path *walked*, which is not always the first in byte order ("a/b" is walked
/// before "a-c", but '-' < '/'): readers that create entries in manifest order need the leader first.
/// Throws FormatError on a duplicate path or a link_to naming no file of the manifest.
void normalize(std::vector<Entry>& entries);

/// Hard-link groups in a form that does not depend on which path a walk met first: for every file in
/// a group of two or more, the group's first path in byte order. `members` maps each path that names
/// another (its link_to) to that path (the anchor); anchors are included in the result.
std::unordered_map<std::string, std::string> link_leaders(const std::vector<std::pair<std::string, std::string>>& members);
/// link_leaders() of a manifest's own link_to fields.
std::unordered_map<std::string, std::string> link_leaders(const std::vector<Entry>& entries);

/// The canonical encoding of a normalized manifest (normalize() first; encode() checks order).
std::string encode(const std::vector<Entry>& entries);
/// Decodes and checks an encoding: version, bounds, strictly increasing paths, root first and a
/// directory, every parent a directory listed before its children, path components neither empty nor
/// "." nor "..", types and fields consistent, link_to naming an earlier file, xattr records well formed,
/// no trailing bytes. Throws FormatError naming what is wrong (never crashes, never over-allocates).
std::vector<Entry> decode(std::string_view bytes);
/// decode() without turning std::bad_alloc into FormatError (decode() does).
std::vector<Entry> decode_checked(std::string_view bytes);
/// BLAKE3 of the encoding: the manifest object's name.
inline hash::Digest digest_of(std::string_view encoded) { return hash::hash_bytes(encoded); }

} // namespace casmig::manifest
