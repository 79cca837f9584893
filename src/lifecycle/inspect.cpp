// Seeing the store without changing it: list_packages() (casmig list) and package_entries() (casmig
// show, casmig_package_entries). Both take no lock and open the catalog read-only.
#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/util/error.hpp"
#include "casmig/walk/walker.hpp"

#include <algorithm>
#include <fcntl.h>
#include <set>
#include <sys/stat.h>

namespace casmig::lifecycle {

using catalog::PackageState;

bool vanished_unmigrated(const catalog::Package& p, bool on_disk) {
    const bool droppable =
        p.state == PackageState::pending || p.state == PackageState::failed || p.state == PackageState::rolled_back;
    return !on_disk && p.tree == catalog::TreeState::present && droppable && !p.has_manifest;
}

std::vector<PackageListing> list_packages(store::Store& s) {
    s.check_catalog(store::Purpose::read, "list");
    auto legacy = s.legacy_dirs();
    std::set<std::string> on_disk(legacy.begin(), legacy.end());
    std::vector<PackageListing> out;
    if (s.has_catalog()) {
        // Read-only, no lock: list never blocks and never writes (WAL readers see the last commit).
        catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
        for (auto& p : cat.packages()) {
            if (vanished_unmigrated(p, on_disk.erase(p.name) > 0)) continue;
            PackageListing l;
            l.name = std::move(p.name);
            l.state = p.state;
            l.tree = p.tree;
            if (p.has_manifest) {
                l.files = static_cast<std::uint64_t>(p.files);
                l.bytes = static_cast<std::uint64_t>(p.bytes);
            }
            if (p.state == PackageState::failed) l.error = std::move(p.error);
            l.verify_error = std::move(p.verify_error);
            out.push_back(std::move(l));
        }
    }
    for (const auto& n : on_disk)
        out.push_back(PackageListing{n, PackageState::pending, catalog::TreeState::present, {}, {}, {}, {}});
    std::sort(out.begin(), out.end(), [](const PackageListing& a, const PackageListing& b) { return a.name < b.name; });
    return out;
}

EntrySource package_entries(store::Store& s, const std::string& name,
                            const std::function<bool(const manifest::Entry&)>& f) {
    s.check_catalog(store::Purpose::read, "show");
    if (s.has_catalog()) {
        catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
        auto p = cat.package(name);
        if (p && p->has_manifest && p->state == PackageState::verified) {
            for (const auto& e : cat.manifest(p->id))
                if (!f(e)) break;
            return EntrySource::manifest;
        }
    }
    // Only a package directory: never objects/, temp/ or another of the store's own directories.
    struct stat st {};
    if (!store::is_package_name(name) || ::fstatat(s.root_fd(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISDIR(st.st_mode))
        throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root() +
                               ": check the id with casmig list");
    try {
        walk::PackageWalker w(s.root_fd(), name);
        walk::Item it;
        while (w.next(it))
            if (!f(it.entry)) break;
    } catch (const walk::PackageError& e) {
        throw util::Error("package " + util::printable(name) +
                          (e.path().empty() ? "" : ": " + util::printable(e.path())) + ": " + e.what());
    }
    return EntrySource::legacy_tree;
}

} // namespace casmig::lifecycle
