// Internal: hard links across packages, put back by rollback (catalog::Entry::xlink).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "casmig/catalog/catalog.hpp"
#include "casmig/progress.hpp"

namespace casmig::lifecycle::detail {

/// One package tree rollback has in hand: built by this run in temp/, or a legacy tree found in place.
struct LinkTree {
    const catalog::Package* pkg = nullptr;
    const std::vector<catalog::Entry>* manifest = nullptr;
    int dirfd = -1;      // the directory holding `name`
    std::string name;    // the tree's directory under dirfd: "rollback-<id>", or the package name
    std::string display; // how messages name the package's tree
    bool built = false;  // built from its manifest by this run (only such trees are changed)
};

struct LinkAcross {
    std::uint64_t linked = 0;   // files of built trees now hard links of a file in another tree
    std::vector<size_t> failed; // trees (indices) left half-relinked: the caller must not publish them
};

/// For each hard-link group across packages (entries with the same xlink), makes the file of every
/// built tree a hard link of one file of the group in another tree — a legacy tree in place first,
/// else the first built tree by package name — but only after proving that file equal to this entry:
/// same content (a file found in place is re-hashed), size, mode, owner, mtime and extended
/// attributes. An inode number reused after both trees were deleted can therefore never join two
/// different files: such a file stays a separate copy (nothing is lost), and `problems` gets a
/// warning naming both; so does one that cannot be a link of it (another filesystem, EXDEV; the link
/// limit, EMLINK). Any other failure to link fails that tree (LinkAcross::failed), as a hard link
/// inside a package does: never a silent copy. The file's own hard links inside its package (link_to) move with it.
/// Every change is a link to a temporary name then a rename over the built file, inside the built tree in temp/ (made
/// durable with it by the caller's sync; recover() deletes an unfinished one).
LinkAcross link_across(const std::vector<LinkTree>& trees, const ProblemSink& problems);

} // namespace casmig::lifecycle::detail
