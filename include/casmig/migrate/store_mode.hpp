// casmig::migrate — choosing the store's zstd mode on its first migrate (cas/compression.hpp).
//
// The mode is chosen once: `migrate --compress[=LEVEL]` on a store that holds no object yet records
// "zstd:LEVEL[:dict=…]" in the catalog (store::write_compression()); later migrates keep it with or
// without the option (--compress=OTHER only changes the level new objects get). --compress on a store
// that already holds raw objects is refused (util::RefusedError, nothing written): converting a store
// is not implemented.
//
// The dictionary is trained when the mode is chosen, from a sample of the small files the run is about
// to migrate (sample_small_files()), written durably to packages/dict/ (cas::ObjectStore::
// store_dictionary) and only then named in the setting: a crash in between leaves an unnamed dictionary
// file (harmless: the next run trains and names another, gc never deletes dictionaries) and no setting,
// so that run starts over. Too few small files (a tiny first selection): no dictionary, "zstd:LEVEL".
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "casmig/migrate/pipeline.hpp"

namespace casmig::migrate {

/// Refuses --compress on a store whose catalog lists raw objects and has no compression setting.
/// Caller holds the store lock. Throws util::RefusedError, util::Error (damaged setting).
void check_compress_option(store::Store& store, const Options& opts);

/// Records the mode on first use (training and storing the dictionary as described above) and sets the
/// compressor on store.objects() when the store is in zstd mode. Caller holds the store lock.
void enable_store_mode(store::Store& store, const Options& opts, const std::vector<catalog::Package>& selected);

/// Up to max_bytes of regular files of 16 bytes to 16 KiB from the packages' legacy trees, spread over
/// them (packages taken at an even stride, at most 64 files each). Unreadable files and packages are
/// skipped (migrate reports them).
std::vector<std::string> sample_small_files(int store_fd, const std::vector<catalog::Package>& packages,
                                            size_t max_bytes);

} // namespace casmig::migrate
