// casmig::migrate — `casmig convert`: a store's objects from raw to zstd (--compress) and back (--raw),
// resumable and crash-safe, on a live store (cas/compression.hpp has the two forms).
//
// Order of a run (caller holds the store lock; materialize may run meanwhile):
//   1. Intent first: the mode is recorded before any object is touched — --compress records the zstd
//      setting (dictionary trained from the store's small objects, stored durably before the setting
//      names it: store_mode.hpp), --raw deletes it — so that a migrate during or after a stopped
//      convert already writes the new form. Mirrored into packages/store.
//   2. Shard by shard (objects/00 … objects/ff), every object in the source form (raw for --compress;
//      .zst for --raw; both forms present counts as source) is read through cas::ObjectReader and
//      BLAKE3-hashed while its new form is written to temp/. An object whose content does not hash to
//      its name, or whose size is not the catalog's, is not converted and not touched: one line names
//      it (verify --objects quarantines it) and the run exits 1 at the end. --compress keeps raw what
//      is not worth compressing (cas::worth_compressing), as migrate does.
//   3. The new forms are published like migrate's (cas::ObjectStore::publish: syncfs, rename without
//      replacing, syncfs). A file already at the new form's name (a stopped run's, or planted) is
//      trusted only if it proves (decode + hash); otherwise it is moved to migration/corrupt/.
//   4. Each new form is proven again from disk (decoded and hashed), then the old form is unlinked, the
//      fan-out directory fsynced (readers never miss an object: both forms exist in between, and every
//      reader takes either).
//   5. One transaction per shard records objects.stored_size of every object of the shard from the
//      forms now on disk, and the cursor (settings row "convert": "<zstd|raw>:<next shard>"); a rerun
//      of the same direction starts at the cursor, a finished pass deletes it. With a time budget, no
//      shard starts after it: the cursor stays for the next run (a nightly timer).
// Crash points: convert.dict-staged/-renamed/-written, convert.compression-recorded (or
// convert.mode-cleared), convert.quarantined (a bad file at a new form's name moved aside), publish.*
// (step 3), convert.placed, convert.unlinked (per object), convert.unlinks-durable, convert.recorded (per
// shard that changed), convert.done. Readers (materialize, under the gc lock only) run meanwhile: an
// object has at least one proven form at every instant.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "casmig/migrate/pipeline.hpp"
#include "casmig/progress.hpp"
#include "casmig/store/store.hpp"

namespace casmig::migrate {

enum class Target { zstd, raw };

struct ConvertOptions {
    Target target = Target::zstd;
    std::optional<int> level;                // --compress=LEVEL (zstd; default: the store's, else 6)
    Dictionary dictionary = Dictionary::yes; // --no-dictionary: a store without a mode trains none
    unsigned threads = 0;                    // 0: all cores
    std::optional<std::chrono::milliseconds> time_budget; // start no shard after this (a nightly batch)
};

struct ConvertResult {
    std::uint64_t objects = 0;   // content objects looked at (variants and foreign files are not)
    std::uint64_t converted = 0; // now in the target form (their old form unlinked)
    std::uint64_t already = 0;   // in the target form before this run
    std::uint64_t kept_raw = 0;  // --compress: not worth compressing, stay raw
    std::uint64_t failed = 0;    // not converted: unreadable, wrong content or size (reported)
    std::uint64_t quarantined = 0; // bad files found at a new form's name, moved to migration/corrupt/
    std::uint64_t bytes_before = 0, bytes_after = 0; // on disk, of the converted objects
    bool stopped_by_budget = false; // shards are left: a rerun continues at the cursor
    bool interrupted = false;       // a stop request (util::request_stop) left shards: likewise
    unsigned shards_left = 0;       // of objects/'s 256 fan-out directories, when stopped
    std::string compression;     // the store's setting after the run ("none": raw)
    double seconds = 0;
};

/// Runs the conversion described above. Problems go to `problems` (one line per object). Throws
/// util::Error when the store cannot be written (disk full, I/O error): what was recorded stays valid
/// and a rerun continues.
ConvertResult convert(store::Store& store, const ConvertOptions& opts, const ProgressSink& progress,
                      const ProblemSink& problems);

} // namespace casmig::migrate
