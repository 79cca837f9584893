#include "casmig/cas/compression.hpp"

#define ZDICT_STATIC_LINKING_ONLY // ZDICT_trainFromBuffer_fastCover: exported by libzstd, declared in this section
#include <zdict.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::cas {

std::string Compression::setting() const {
    std::string s = "zstd:" + std::to_string(level);
    if (dict) s += ":dict=" + dict->hex();
    return s;
}

Compression Compression::parse(std::string_view s) {
    auto bad = [&]() -> util::Error {
        return util::Error("the catalog's compression setting '" + util::printable(s) +
                           "' is not one casmig writes (zstd:<level>[:dict=<64 hex>]): the catalog is damaged; " +
                           "restore a current backup of store.db");
    };
    if (s.substr(0, 5) != "zstd:") throw bad();
    std::string_view rest = s.substr(5);
    size_t colon = rest.find(':');
    std::string_view lv = rest.substr(0, colon);
    Compression c;
    auto [p, ec] = std::from_chars(lv.data(), lv.data() + lv.size(), c.level);
    if (ec != std::errc() || p != lv.data() + lv.size() || lv.empty() || c.level < 1 || c.level > ZSTD_maxCLevel())
        throw bad();
    if (colon != std::string_view::npos) {
        std::string_view d = rest.substr(colon + 1);
        if (d.substr(0, 5) != "dict=") throw bad();
        c.dict = hash::Digest::from_hex(d.substr(5));
        if (!c.dict) throw bad();
    }
    return c;
}

bool worth_compressing(std::uint64_t size, std::uint64_t compressed) {
    if (size < k_compress_min || compressed >= size) return false;
    std::uint64_t saved = size - compressed;
    return saved >= k_saving_min && saved * k_saving_den >= size;
}

namespace {

struct CctxFree {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};

/// This thread's compression context, made once and reused for every object the thread compresses.
ZSTD_CCtx* thread_cctx() {
    thread_local std::unique_ptr<ZSTD_CCtx, CctxFree> ctx(ZSTD_createCCtx());
    if (!ctx) throw util::Error("zstd: cannot create a compression context (out of memory)");
    return ctx.get();
}

/// Decompression contexts of this thread not in use by a reader (a reader takes one for its life; two
/// readers open at once on one thread take two). Bounded: at most 4 are kept.
struct DctxPool {
    std::vector<ZSTD_DCtx*> free;
    ~DctxPool() {
        for (auto* d : free) ZSTD_freeDCtx(d);
    }
};
thread_local DctxPool t_dctx;

ZSTD_DCtx* take_dctx() {
    if (!t_dctx.free.empty()) {
        ZSTD_DCtx* d = t_dctx.free.back();
        t_dctx.free.pop_back();
        return d;
    }
    ZSTD_DCtx* d = ZSTD_createDCtx();
    if (!d) throw util::Error("zstd: cannot create a decompression context (out of memory)");
    return d;
}

void give_dctx(ZSTD_DCtx* d) noexcept {
    if (!d) return;
    if (t_dctx.free.size() < 4) {
        try {
            t_dctx.free.push_back(d);
            return;
        } catch (...) { // out of memory: free it instead
        }
    }
    ZSTD_freeDCtx(d);
}

} // namespace

Compressor::Compressor(int level, std::string_view dict) : m_level(level) {
    if (!dict.empty()) {
        m_cdict = ZSTD_createCDict(dict.data(), dict.size(), level);
        if (!m_cdict) throw util::Error("zstd refuses the store's dictionary (packages/dict/): it is damaged");
    }
}

Compressor::~Compressor() { ZSTD_freeCDict(m_cdict); }

void Compressor::compress(const char* data, size_t n, std::string& out) const {
    ZSTD_CCtx* cctx = thread_cctx();
    out.resize(ZSTD_compressBound(n));
    size_t r = m_cdict && n <= k_dict_max ? ZSTD_compress_usingCDict(cctx, out.data(), out.size(), data, n, m_cdict)
                                          : ZSTD_compressCCtx(cctx, out.data(), out.size(), data, n, m_level);
    if (ZSTD_isError(r)) throw util::Error(std::string("zstd compression failed: ") + ZSTD_getErrorName(r));
    out.resize(r);
}

Compressor::Stream::Stream(const Compressor& c, std::uint64_t pledged_size) : m_out(ZSTD_CStreamOutSize()) {
    ZSTD_CCtx* cctx = thread_cctx();
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    size_t r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, c.level());
    if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
    if (!ZSTD_isError(r)) r = ZSTD_CCtx_setPledgedSrcSize(cctx, pledged_size);
    if (ZSTD_isError(r)) throw util::Error(std::string("zstd: cannot start a frame: ") + ZSTD_getErrorName(r));
}

bool Compressor::Stream::step(const char* data, size_t n, size_t& pos, bool end, size_t& produced) {
    ZSTD_inBuffer in{data, n, pos};
    ZSTD_outBuffer out{m_out.data(), m_out.size(), 0};
    size_t r = ZSTD_compressStream2(thread_cctx(), &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
    if (ZSTD_isError(r)) throw util::Error(std::string("zstd compression failed: ") + ZSTD_getErrorName(r));
    pos = in.pos;
    produced = out.pos;
    if (end) return r != 0;           // r: bytes still to flush
    return in.pos < in.size || out.pos == out.size; // input left, or output may be pending
}

// ------------------------------------------------------------------ dictionaries

Dictionaries::~Dictionaries() {
    for (auto& [id, d] : m_by_id) ZSTD_freeDDict(d);
}

namespace {

/// Reads a whole small file (a dictionary); nullopt if it is absent.
std::optional<std::string> read_small(int dirfd, const std::string& name, const std::string& display) {
    int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return std::nullopt;
        util::throw_errno("cannot open", display);
    }
    util::Fd owned(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) util::throw_errno("cannot stat", display);
    if (!S_ISREG(st.st_mode) || st.st_size > (64 << 20)) return std::nullopt; // not a dictionary casmig wrote
    std::string out(static_cast<size_t>(st.st_size), '\0');
    size_t got = 0;
    while (got < out.size()) {
        ssize_t n = ::pread(fd, out.data() + got, out.size() - got, static_cast<off_t>(got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) util::throw_errno("read failed", display);
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    out.resize(got);
    return out;
}

hash::Digest blake3_of(std::string_view s) {
    hash::Hasher h;
    h.update(s.data(), s.size());
    return h.finish();
}

} // namespace

void Dictionaries::scan() const {
    // Called with m_mutex held. A missing directory means no dictionary yet.
    m_scanned = true;
    int dfd = ::open(m_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        if (errno == ENOENT) return;
        util::throw_errno("cannot open directory", m_dir);
    }
    util::Fd dir(dfd);
    for (const auto& n : util::list_dir(dfd, m_dir)) {
        auto named = hash::Digest::from_hex(n);
        if (!named || n.size() != 64) continue; // temp names and foreign files are not dictionaries
        auto bytes = read_small(dfd, n, m_dir + "/" + n);
        if (!bytes || blake3_of(*bytes) != *named) continue; // damaged: verify --objects names it
        unsigned id = ZDICT_getDictID(bytes->data(), bytes->size());
        if (id == 0 || m_by_id.count(id)) continue;
        ZSTD_DDict* d = ZSTD_createDDict(bytes->data(), bytes->size());
        if (d) m_by_id.emplace(id, d);
    }
}

ZSTD_DDict_s* Dictionaries::find(unsigned id) const {
    std::lock_guard lk(m_mutex);
    auto it = m_by_id.find(id);
    if (it != m_by_id.end()) return it->second;
    // A dictionary written after the last scan (this process trained it): look again, once per miss.
    scan();
    it = m_by_id.find(id);
    return it == m_by_id.end() ? nullptr : it->second;
}

std::string Dictionaries::load(const hash::Digest& d) const {
    int dfd = ::open(m_dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    std::optional<std::string> bytes;
    if (dfd >= 0) {
        util::Fd dir(dfd);
        bytes = read_small(dfd, d.hex(), m_dir + "/" + d.hex());
    }
    if (!bytes)
        throw util::Error("the store's zstd dictionary " + m_dir + "/" + d.hex() +
                          " is missing: restore it from a backup (objects compressed with it cannot be read without it)");
    if (blake3_of(*bytes) != d)
        throw util::Error("the store's zstd dictionary " + m_dir + "/" + d.hex() +
                          " does not hash to its name: restore it from a backup");
    return *bytes;
}

// ------------------------------------------------------------------ reader

ObjectReader::ObjectReader(util::Fd fd, Form form, std::string display, const Dictionaries* dicts)
    : m_fd(std::move(fd)), m_form(form), m_display(std::move(display)), m_dicts(dicts) {
    struct stat st {};
    if (::fstat(m_fd.get(), &st) != 0) util::throw_errno("cannot stat object", m_display);
    m_stored = static_cast<std::uint64_t>(st.st_size);
    if (m_form == Form::raw) m_content_size = m_stored;
}

ObjectReader::ObjectReader(ObjectReader&& o) noexcept
    : m_fd(std::move(o.m_fd)), m_form(o.m_form), m_display(std::move(o.m_display)), m_dicts(o.m_dicts),
      m_stored(o.m_stored), m_offset(o.m_offset), m_produced(o.m_produced), m_content_size(o.m_content_size),
      m_dctx(std::exchange(o.m_dctx, nullptr)), m_in(std::move(o.m_in)), m_in_cap(o.m_in_cap), m_in_pos(o.m_in_pos), m_in_len(o.m_in_len),
      m_started(o.m_started), m_done(o.m_done) {}

ObjectReader::~ObjectReader() { give_dctx(m_dctx); }

void ObjectReader::fill() {
    // Keeps what is unconsumed, appends from the file.
    if (m_in_pos > 0) {
        std::memmove(m_in.get(), m_in.get() + m_in_pos, m_in_len - m_in_pos);
        m_in_len -= m_in_pos;
        m_in_pos = 0;
    }
    // Until the buffer is full or the file ends: a small object is then read whole at once.
    while (m_in_len < m_in_cap && m_offset < m_stored) {
        ssize_t n = ::pread(m_fd.get(), m_in.get() + m_in_len, m_in_cap - m_in_len, static_cast<off_t>(m_offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) util::throw_errno("read failed", m_display);
        if (n == 0) break; // shorter than at open: the frame checks below report it
        m_in_len += static_cast<size_t>(n);
        m_offset += static_cast<std::uint64_t>(n);
    }
}

namespace {
/// .zst files up to this size are read whole and, when the caller's buffer holds the content, decompressed
/// in one call (no streaming window to copy through: verify --objects reads most objects this way).
constexpr std::uint64_t k_whole_max = 1 << 20;
} // namespace

ZSTD_DDict_s* ObjectReader::dictionary() {
    unsigned id = ZSTD_getDictID_fromFrame(m_in.get() + m_in_pos, m_in_len - m_in_pos);
    if (id == 0) return nullptr;
    ZSTD_DDict* dict = m_dicts ? m_dicts->find(id) : nullptr;
    if (!dict)
        throw MissingDictionary(m_display + " needs zstd dictionary " + std::to_string(id) + ", which is not in " +
                                (m_dicts ? m_dicts->dir() : std::string(k_dict_dir)) +
                                " (or is damaged there): restore that dictionary from a backup");
    return dict;
}

std::uint64_t ObjectReader::content_size() {
    if (m_content_size) return *m_content_size;
    // Only the frame header (at most 18 bytes): verify asks every object's size without reading it.
    char hdr[18];
    size_t got = 0;
    while (got < sizeof hdr && got < m_stored) {
        ssize_t n = ::pread(m_fd.get(), hdr + got, sizeof hdr - got, static_cast<off_t>(got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) util::throw_errno("read failed", m_display);
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    unsigned long long cs = ZSTD_getFrameContentSize(hdr, got);
    if (cs == ZSTD_CONTENTSIZE_ERROR || cs == ZSTD_CONTENTSIZE_UNKNOWN)
        throw CorruptObject(m_display + " is not a zstd frame with its content size");
    m_content_size = cs;
    return cs;
}

size_t ObjectReader::read(char* buf, size_t len) {
    if (m_form == Form::raw) {
        for (;;) {
            ssize_t n = ::pread(m_fd.get(), buf, len, static_cast<off_t>(m_offset));
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) util::throw_errno("read failed", m_display);
            m_offset += static_cast<std::uint64_t>(n);
            m_produced += static_cast<std::uint64_t>(n);
            return static_cast<size_t>(n);
        }
    }
    if (m_done || len == 0) return 0;
    if (!m_started) {
        const std::uint64_t want = content_size(); // checks it is a frame
        m_in_cap = static_cast<size_t>(m_stored <= k_whole_max ? std::max<std::uint64_t>(m_stored, 1) : ZSTD_DStreamInSize());
        m_in.reset(new char[m_in_cap]);
        fill(); // a small file whole, a large one's first ZSTD_DStreamInSize() bytes
        ZSTD_DDict* dict = dictionary();
        m_dctx = take_dctx();
        m_started = true;
        if (m_stored <= k_whole_max && want <= len) {
            // The whole file is in m_in: exactly one frame, decompressed straight into the caller's buffer.
            m_done = true;
            if (m_in_len != m_stored) throw CorruptObject(m_display + " changed while being read");
            size_t frame = ZSTD_findFrameCompressedSize(m_in.get(), m_in_len);
            if (ZSTD_isError(frame)) throw CorruptObject(m_display + " does not decompress: " + ZSTD_getErrorName(frame));
            if (frame != m_in_len) throw CorruptObject(m_display + " has bytes after its zstd frame");
            size_t r = ZSTD_decompress_usingDDict(m_dctx, buf, static_cast<size_t>(want), m_in.get(), m_in_len, dict);
            if (ZSTD_isError(r)) throw CorruptObject(m_display + " does not decompress: " + ZSTD_getErrorName(r));
            if (r != want)
                throw CorruptObject(m_display + " decompresses to " + std::to_string(r) + " bytes, its header says " +
                                    std::to_string(want));
            m_produced = r;
            return r;
        }
        ZSTD_DCtx_reset(m_dctx, ZSTD_reset_session_and_parameters);
        if (dict) ZSTD_DCtx_refDDict(m_dctx, dict);
    }
    for (;;) {
        if (m_in_pos == m_in_len && m_offset < m_stored) fill();
        ZSTD_inBuffer in{m_in.get(), m_in_len, m_in_pos};
        ZSTD_outBuffer out{buf, len, 0};
        size_t r = ZSTD_decompressStream(m_dctx, &out, &in);
        if (ZSTD_isError(r)) throw CorruptObject(m_display + " does not decompress: " + ZSTD_getErrorName(r));
        m_in_pos = in.pos;
        m_produced += out.pos;
        if (m_produced > *m_content_size)
            throw CorruptObject(m_display + " decompresses to more than the " + std::to_string(*m_content_size) +
                                " bytes its header says");
        if (r == 0) { // the frame is complete: nothing may follow it
            m_done = true;
            if (m_in_pos != m_in_len || m_offset < m_stored)
                throw CorruptObject(m_display + " has bytes after its zstd frame");
            if (m_produced != *m_content_size)
                throw CorruptObject(m_display + " decompresses to " + std::to_string(m_produced) + " bytes, its header says " +
                                    std::to_string(*m_content_size));
            return out.pos;
        }
        if (out.pos > 0) return out.pos;
        if (m_in_pos == m_in_len && m_offset >= m_stored)
            throw CorruptObject(m_display + " is a truncated zstd frame");
        // Only header or block bytes consumed so far: go on.
    }
}

hash::Digest hash_content(ObjectReader& r, std::uint64_t* n) {
    // 1 MiB: most objects are decompressed into it in one call (ObjectReader::read()).
    thread_local std::vector<char> buf(1 << 20);
    hash::Hasher h;
    std::uint64_t total = 0;
    for (;;) {
        size_t got = r.read(buf.data(), buf.size());
        if (got == 0) break;
        h.update(buf.data(), got);
        total += got;
    }
    if (n) *n = total;
    return h.finish();
}

std::string train_dictionary(const std::vector<std::string>& samples, int level, size_t max_bytes) {
    if (samples.size() < 16) return {};
    std::string all;
    std::vector<size_t> sizes;
    sizes.reserve(samples.size());
    for (const auto& s : samples) {
        all += s;
        sizes.push_back(s.size());
    }
    std::string dict(max_bytes, '\0');
    // fastCover with fixed parameters (segment k = 1024, d-mers of 8, 2^20 frequency slots), not
    // ZDICT_trainFromBuffer's search over k: on the npm corpus's 4.5 MB sample that search took 0.5 s
    // of one core before any object could be compressed, for a dictionary no better (ratio 5.44 vs
    // 5.45 on 20,000 held-out small files; docs/benchmarks.md).
    ZDICT_fastCover_params_t p{};
    p.k = 1024;
    p.d = 8;
    p.f = 20;
    p.accel = 1;
    p.zParams.compressionLevel = level;
    size_t r = ZDICT_trainFromBuffer_fastCover(dict.data(), dict.size(), all.data(), sizes.data(),
                                               static_cast<unsigned>(sizes.size()), p);
    if (ZDICT_isError(r)) return {};
    dict.resize(r);
    return dict;
}

} // namespace casmig::cas
