// Internal: builds a package tree from its manifest under an open directory fd.
#pragma once
#include <string>
#include <vector>

#include "casmig/cas/object_store.hpp"
#include "casmig/catalog/catalog.hpp"
#include "casmig/lifecycle/lifecycle.hpp"

namespace casmig::lifecycle::detail {

/// Writes every entry of `manifest` below `dest_fd` (an empty directory the caller owns; the root
/// entry "" applies to it). Every write is relative to a directory fd opened with O_NOFOLLOW, so a
/// manifest whose parent path is not a directory it created (a crafted symlink) is refused with
/// util::Error, never followed. Directory modes and mtimes are set after their children exist.
void build_tree(int dest_fd, const std::string& dest_display, const std::vector<catalog::Entry>& manifest,
                cas::ObjectStore& objects, LinkMode link, MaterializeResult& result);

} // namespace casmig::lifecycle::detail
