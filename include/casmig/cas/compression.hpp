// casmig::cas — the zstd store mode: compressed object variants, the store's dictionary, one reader.
//
// On-disk format
//   objects/<2 hex>/<62 hex>.zst   the object's content as exactly one zstd frame (RFC 8878) and nothing
//                                  after it: the frame header carries the uncompressed size
//                                  (Frame_Content_Size, always present) and, when a dictionary was used,
//                                  its Dictionary_ID; no zstd checksum (the name, the BLAKE3 of the
//                                  *uncompressed* bytes, is the check). Mode 0444 like a raw object.
//   packages/dict/<64 hex>         a zstd dictionary (ZDICT format, magic 0xEC30A437), named by the
//                                  BLAKE3 of its bytes. A .zst object names no dictionary file: a reader
//                                  takes the Dictionary_ID from the frame and finds the dictionary in
//                                  packages/dict/ whose ZDICT header has that ID (and whose bytes hash to
//                                  its name). Dictionaries are never deleted by casmig (gc leaves
//                                  packages/ alone): an object made with one always finds it.
//   One digest has one form on disk in the normal state (raw or .zst); readers accept either and take
//   the raw one when both exist (after a crash between two writers, a repair that wrote raw, or a
//   convert stopped between placing an object's new form and unlinking its old one).
//   A store being converted (migrate/convert.hpp) is mixed: the setting already names the target mode
//   (new objects are written in it), shards not yet converted hold the other form, and the catalog's
//   settings row `convert` ("zstd:<shard>" or "raw:<shard>") is where a rerun continues. A zstd store
//   always holds raw objects too: those below the threshold, and those a repair rewrote.
//
// When an object is stored compressed (the threshold, measured on the npm corpus, docs/benchmarks.md):
//   objects of fewer than k_compress_min bytes stay raw; a larger one is kept as .zst only if the frame
//   saves at least 1/k_saving_den of its size and at least k_saving_min bytes, else raw (a frame that
//   saves nothing would only cost a decompression on every read). Objects up to k_dict_max bytes are
//   compressed with the store's dictionary (if it has one), larger ones without: a dictionary helps
//   while a file is too short to build its own history.
//
// The setting: the catalog's settings row `compression` holds Compression::setting(), e.g. "zstd:6" or
// "zstd:6:dict=<64 hex>" (store/store.hpp read_compression(), write_compression()). No row: raw store.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "casmig/hash/blake3.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

struct ZSTD_CDict_s;
struct ZSTD_DDict_s;
struct ZSTD_DCtx_s;

namespace casmig::cas {

/// Suffix of a compressed object's file name.
inline constexpr std::string_view k_zst_suffix = ".zst";
/// Where dictionaries live, relative to the store root.
inline constexpr const char* k_dict_dir = "packages/dict";
/// The level `--compress` takes without a value. Measured on the npm corpus (docs/benchmarks.md): level 6
/// stores 10% less than level 3 (borg's default) for about 25% more compression CPU, and migrate stays
/// bound by file-system work, not compression; 9 gains 4% more for 50% more CPU.
inline constexpr int k_default_level = 6;
inline constexpr std::uint64_t k_compress_min = 64;
inline constexpr std::uint64_t k_saving_den = 8;
inline constexpr std::uint64_t k_saving_min = 32;
/// Up to 32 KiB zstd attaches the dictionary's tables (levels 5 to 9); above, it copies them into the
/// context for every object (about 1.5 MB at level 6), which cost more time than the dictionary saved
/// bytes on the npm corpus (docs/benchmarks.md).
inline constexpr std::uint64_t k_dict_max = 32 * 1024;
/// Dictionary size asked of ZDICT (zstd's own default for `zstd --train`).
inline constexpr size_t k_dict_size = 112640;

/// The two forms of an object on disk.
enum class Form { raw, zstd };

/// The store's compression setting.
struct Compression {
    int level = k_default_level;
    std::optional<hash::Digest> dict; // BLAKE3 of the dictionary under packages/dict/, if one is used
    /// "zstd:<level>" or "zstd:<level>:dict=<64 hex>".
    std::string setting() const;
    /// Parses setting(); throws util::Error naming the value if it is not one.
    static Compression parse(std::string_view s);
};

/// True if a frame of `compressed` bytes is worth keeping instead of `size` raw bytes (see above).
bool worth_compressing(std::uint64_t size, std::uint64_t compressed);

/// An object file whose bytes are not what its name says in a way only its format shows (not a zstd
/// frame, truncated, trailing bytes, dictionary missing). what(): one line naming the file.
class CorruptObject : public util::Error {
public:
    using util::Error::Error;
};

/// A .zst object whose frame names a dictionary packages/dict/ does not hold (intact): the object may
/// well be good; the dictionary is what to restore.
class MissingDictionary : public CorruptObject {
public:
    using CorruptObject::CorruptObject;
};

/// Compresses objects at one level with an optional dictionary. Thread-safe: each thread reuses its own
/// ZSTD_CCtx (created on first use, kept for the thread's life: memory stays one context per worker).
class Compressor {
public:
    /// dict: the dictionary's bytes ("" for none). Throws util::Error if zstd refuses the dictionary.
    Compressor(int level, std::string_view dict);
    ~Compressor();
    Compressor(const Compressor&) = delete;
    Compressor& operator=(const Compressor&) = delete;
    int level() const { return m_level; }
    bool has_dict() const { return m_cdict != nullptr; }
    /// Compresses n bytes as one frame into `out` (resized to the frame's size); uses the dictionary when
    /// n ≤ k_dict_max. Throws util::Error if zstd fails (out of memory).
    void compress(const char* data, size_t n, std::string& out) const;

    /// Streams one large object (no dictionary) through the thread's context: begin(), feed() the
    /// bytes, finish(). Each call hands complete output to `sink`.
    class Stream {
    public:
        Stream(const Compressor& c, std::uint64_t pledged_size);
        template <class Sink> void feed(const char* data, size_t n, Sink&& sink) { run(data, n, false, sink); }
        template <class Sink> void finish(Sink&& sink) { run(nullptr, 0, true, sink); }

    private:
        template <class Sink> void run(const char* data, size_t n, bool end, Sink& sink) {
            size_t pos = 0;
            for (;;) {
                size_t produced = 0;
                bool more = step(data, n, pos, end, produced);
                if (produced) sink(m_out.data(), produced);
                if (!more) return;
            }
        }
        /// One ZSTD_compressStream2 call; false when this feed/finish is complete.
        bool step(const char* data, size_t n, size_t& pos, bool end, size_t& produced);
        std::vector<char> m_out;
    };

private:
    int m_level;
    ZSTD_CDict_s* m_cdict = nullptr;
};

/// The store's dictionaries (packages/dict/), loaded on first need, by Dictionary_ID. Thread-safe.
class Dictionaries {
public:
    /// dir: the store's packages/dict (it need not exist).
    explicit Dictionaries(std::string dir) : m_dir(std::move(dir)) {}
    ~Dictionaries();
    Dictionaries(const Dictionaries&) = delete;
    Dictionaries& operator=(const Dictionaries&) = delete;
    /// The dictionary with this ID, nullptr if packages/dict/ has none (a file whose bytes do not hash
    /// to its name is never used). Throws util::SystemError if the directory cannot be read.
    ZSTD_DDict_s* find(unsigned id) const;
    /// The bytes of packages/dict/<hex of d>, checked against d; throws util::Error if missing or wrong.
    std::string load(const hash::Digest& d) const;
    const std::string& dir() const { return m_dir; }

private:
    void scan() const;
    std::string m_dir;
    mutable std::mutex m_mutex;
    mutable bool m_scanned = false;
    mutable std::map<unsigned, ZSTD_DDict_s*> m_by_id;
};

/// Reads one object's uncompressed bytes, whichever form it is stored in. Move-only; owns its fd.
class ObjectReader {
public:
    /// fd: the object file, open for reading; display names it in errors; dicts: where a frame's
    /// dictionary is found (may be null for a raw object).
    ObjectReader(util::Fd fd, Form form, std::string display, const Dictionaries* dicts);
    ObjectReader(ObjectReader&&) noexcept;
    ObjectReader& operator=(ObjectReader&&) = delete;
    ~ObjectReader();
    Form form() const { return m_form; }
    /// The object file (a raw object's fd can be cloned or copied with copy_file_range).
    int fd() const { return m_fd.get(); }
    const std::string& display() const { return m_display; }
    /// Bytes the file takes (its st_size).
    std::uint64_t stored_size() const { return m_stored; }
    /// The uncompressed size: a raw file's size, or the frame header's content size (throws
    /// CorruptObject if the header is not a zstd frame header with one).
    std::uint64_t content_size();
    /// Reads up to len uncompressed bytes into buf; 0 at the end. A .zst file that is not exactly one
    /// valid frame throws CorruptObject; a read error throws util::SystemError.
    size_t read(char* buf, size_t len);

private:
    void fill();
    /// The frame's dictionary (nullptr for none); throws MissingDictionary.
    ZSTD_DDict_s* dictionary();
    util::Fd m_fd;
    Form m_form;
    std::string m_display;
    const Dictionaries* m_dicts;
    std::uint64_t m_stored = 0;
    std::uint64_t m_offset = 0;   // file offset read so far (pread: the fd's offset is left alone)
    std::uint64_t m_produced = 0; // uncompressed bytes returned
    std::optional<std::uint64_t> m_content_size;
    ZSTD_DCtx_s* m_dctx = nullptr;
    std::unique_ptr<char[]> m_in; // uninitialised: a whole small .zst file, or the streaming window's input
    size_t m_in_cap = 0, m_in_pos = 0, m_in_len = 0;
    bool m_started = false, m_done = false;
};

/// BLAKE3 of the reader's uncompressed bytes; *n gets their count. Throws what read() throws.
hash::Digest hash_content(ObjectReader& r, std::uint64_t* n = nullptr);

/// Trains a dictionary of at most max_bytes on the samples (ZDICT fastCover, fixed parameters) for
/// compression at `level`. "" if zstd finds too little in them to build one (too few or too uniform samples).
std::string train_dictionary(const std::vector<std::string>& samples, int level = k_default_level,
                             size_t max_bytes = k_dict_size);

} // namespace casmig::cas
