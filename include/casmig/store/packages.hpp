// casmig::store::PackageIndex — <store>/packages/, the store's own description: what rebuild-catalog
// recreates store.db from when the catalog is lost (docs/format.md has the byte formats).
//
//   packages/manifests/<2 hex>/<62 hex>  a manifest in the canonical encoding (manifest/manifest.hpp),
//                                        named by the BLAKE3 of its bytes; mode 0444, never rewritten
//   packages/refs/<package>              "<64 hex>\n": the package's current manifest object
//   packages/store                       store settings, "casmig-store 1\n" then "key value\n" lines
//                                        sorted by key (mode, and what later features add)
//
// Durability, the same discipline as objects (cas/object_store.hpp): stage() writes temp files in the
// object store's own staging directory; publish() syncfs()es (their data is durable), renames each
// manifest into place (RENAME_NOREPLACE; a file already at the name is checked by content, and one that
// is not the manifest goes to migration/corrupt/), renames each ref over the old one, then syncfs()es
// again; only then does the caller commit the catalog rows that name these manifests. A crash leaves
// refs that name complete manifests whose objects are durable (the caller publishes objects first), or
// temp files the next locked run removes.
//
// The catalog is the authority while it belongs to the store; packages/ follows it. A ref may outlive
// its catalog row for a moment (drop_ref() runs after the row's commit): gc removes refs whose package
// the catalog does not hold, and manifest objects no package names.
//
// Thread safety: one thread (the migrate committer or a command) uses an index at a time.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "casmig/hash/blake3.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

namespace casmig::store {

class Store;

/// Relative to packages/.
inline constexpr const char* k_manifests_dir = "manifests";
inline constexpr const char* k_refs_dir = "refs";
inline constexpr const char* k_settings_file = "store";

class PackageIndex {
public:
    /// Creates packages/, packages/manifests/ and packages/refs/ if missing (the store layout exists).
    explicit PackageIndex(Store& store);
    ~PackageIndex();

    /// Writes `encoded` (a manifest's canonical encoding, digest d) as a staged manifest object unless
    /// it is known present, and a staged ref naming it for `package`. Not durable until publish().
    void stage(const std::string& package, const std::string& encoded, const hash::Digest& d);
    /// Stages only a ref naming manifest d, which must already be in place (publish() does not check).
    void stage_ref(const std::string& package, const hash::Digest& d);
    /// Makes every staged manifest and ref durable and visible (see above). Returns the number of
    /// manifest objects placed. A file found at a manifest's name that is not it is moved to
    /// migration/corrupt/ and `quarantined` names it. Throws util::SystemError; what was not placed
    /// is removed.
    /// staged_durable: the caller has synced this filesystem after the last stage() (the object
    /// store's publish() did, PublishStats::synced_after): the first syncfs is then skipped.
    size_t publish(std::vector<std::string>* quarantined = nullptr, bool staged_durable = false);
    /// Removes the staged, unpublished files (a batch that will not be recorded).
    void discard() noexcept { discard_staged(); }
    /// Removes a package's ref durably (fsync of refs/). No ref: nothing to do.
    void drop_ref(const std::string& package);

    /// The manifest object a package's ref names; nullopt if there is no ref. Throws util::Error naming
    /// the ref if it is damaged.
    std::optional<hash::Digest> ref(const std::string& package) const;
    /// Every package name with a ref (sorted).
    std::vector<std::string> ref_names() const;
    /// Reads manifest object d and checks that its bytes hash to d. Throws util::Error ("missing",
    /// "damaged: content hashes to ...") naming the object.
    std::string read_manifest(const hash::Digest& d) const;
    /// Every manifest object present (sorted); files that are not named like one are skipped.
    std::vector<hash::Digest> manifest_objects() const;
    /// Deletes a manifest object (gc): unlink and fsync of its directory.
    void delete_manifest(const hash::Digest& d);
    /// Moves a manifest object that is not what its name says to migration/corrupt/; returns where.
    std::string quarantine_manifest(const hash::Digest& d);

    /// The store settings file (empty map if there is none). Throws util::Error if it is damaged.
    std::map<std::string, std::string> settings() const;
    /// Sets one setting (read, change, write to a temp file, fsync, rename, fsync of packages/).
    void set_setting(const std::string& key, const std::string& value);
    /// Removes one setting, the same way (no-op if it is not there).
    void erase_setting(const std::string& key);

    /// "packages/manifests/ab/…" for messages.
    static std::string manifest_relpath(const hash::Digest& d);

private:
    /// set_setting() (value) or erase_setting() (nullopt).
    void change_setting(const std::string& key, const std::optional<std::string>& value);
    struct StagedManifest {
        hash::Digest digest;
        std::string temp;
    };
    struct StagedRef {
        std::string package, temp;
    };
    Store& m_store;
    util::Fd m_dir, m_manifests, m_refs;
    std::vector<StagedManifest> m_manifests_staged;
    std::vector<StagedRef> m_refs_staged;
    std::uint64_t m_temp_counter = 0;
    std::string write_temp(const std::string& bytes, mode_t mode);
    /// Moves dirfd/name to migration/aside/<prefix><name>.<time>; returns where.
    std::string move_aside(int dirfd, const std::string& name, const std::string& prefix);
    void discard_staged() noexcept;
};

/// Mirrors the store mode into packages/store (rebuild-catalog's source for it).
void record_mode(PackageIndex& index, const std::string& mode);

/// Runs a step that only mirrors into packages/ what the catalog has already committed: its failure
/// does not undo the command (the next locked command's sync, or gc, redoes it) and comes back as the
/// text of a warning; nullopt when it succeeded.
template <class F>
std::optional<std::string> mirror_step(F&& step) {
    try {
        step();
        return std::nullopt;
    } catch (const util::Error& e) {
        return std::string(e.what()) + " (packages/ is brought up to the catalog by the next casmig command)";
    }
}

} // namespace casmig::store
