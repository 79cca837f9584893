// casmig::migrate — choosing the store's zstd mode on its first migrate (cas/compression.hpp).
//
// The mode is chosen by `migrate --compress[=LEVEL]` on a store that holds no object yet, or by
// `convert --compress[=LEVEL]` on one that does (migrate/convert.hpp); either records
// "zstd:LEVEL[:dict=…]" in the catalog (store::write_compression()); later migrates keep it with or
// without the option (--compress=OTHER only changes the level new objects get). migrate --compress on
// a store that already holds raw objects is refused (util::RefusedError, nothing written): that is
// convert's job. `convert --raw` deletes the setting.
//
// The dictionary is trained when the mode is chosen, from a sample of small contents (migrate: the
// files the run is about to migrate, sample_small_files(); convert: the store's objects,
// sample_small_objects()), written durably to packages/dict/ (cas::ObjectStore::store_dictionary) and
// only then named in the setting: a crash in between leaves an unnamed dictionary file (harmless: the
// next run trains and names another, gc never deletes dictionaries) and no setting, so that run starts
// over. Too few small samples (a tiny first selection): no dictionary, "zstd:LEVEL".
#pragma once
#include <cstddef>
#include <functional>
#include <optional>
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

/// The store's zstd mode for a run that asks for it: the recorded one (its level changed to `level`, if
/// given and different), or on a store that has none a new one at `level` (default cas::k_default_level)
/// with a dictionary trained from samples() unless Dictionary::no, stored durably before the setting
/// names it. Journals under `command`; crash points <command>.dict-* and <command>.compression-recorded.
/// Caller holds the store lock.
cas::Compression choose_compression(store::Store& store, std::optional<int> level, Dictionary dictionary,
                                    const std::function<std::vector<std::string>()>& samples, const std::string& command);
/// New objects are written in mode c: sets the compressor on store.objects() and mirrors the setting
/// into packages/store (a failure there is redone by the next command's sync).
void use_compression(store::Store& store, const cas::Compression& c);

/// Up to max_bytes of the uncompressed contents of objects of 16 bytes to 16 KiB that the catalog lists,
/// taken at an even stride over them (either form is read). Unreadable objects are skipped.
std::vector<std::string> sample_small_objects(store::Store& store, size_t max_bytes);
/// Samples for a dictionary of cas::k_dict_size: 40 times its size (zstd advises about 100), 4.5 MB.
/// On the npm corpus a dictionary from 4 MB compressed held-out small files as well as one from
/// 11 MB (ratio 5.71 vs 5.44) and took a fifth of the time to sample and train (docs/benchmarks.md).
inline constexpr size_t k_sample_bytes = 40 * cas::k_dict_size;

/// Up to max_bytes of regular files of 16 bytes to 16 KiB from the packages' legacy trees, spread over
/// them (packages taken at an even stride, at most 64 files each). Unreadable files and packages are
/// skipped (migrate reports them).
std::vector<std::string> sample_small_files(int store_fd, const std::vector<catalog::Package>& packages,
                                            size_t max_bytes);

} // namespace casmig::migrate
