#include "casmig/hash/blake3.hpp"

#include "casmig/util/error.hpp"

#include <blake3.h>
#include <cerrno>
#include <cstring>
#include <algorithm>
#include <fcntl.h>
#include <mutex>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace casmig::hash {

static const char k_hex[] = "0123456789abcdef";

std::string Digest::hex() const {
    std::string s(64, '0');
    for (size_t i = 0; i < 32; ++i) {
        s[2 * i] = k_hex[bytes[i] >> 4];
        s[2 * i + 1] = k_hex[bytes[i] & 15];
    }
    return s;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

std::optional<Digest> Digest::from_hex(std::string_view hex) {
    if (hex.size() != 64) return std::nullopt;
    Digest d;
    for (size_t i = 0; i < 32; ++i) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return std::nullopt;
        d.bytes[i] = static_cast<std::uint8_t>(hi << 4 | lo);
    }
    return d;
}

Digest Digest::from_raw(std::string_view raw) {
    Digest d;
    std::memcpy(d.bytes.data(), raw.data(), std::min<size_t>(raw.size(), 32));
    return d;
}

struct Hasher::Impl {
    blake3_hasher h;
};

Hasher::Hasher() : m_impl(std::make_unique<Impl>()) { blake3_hasher_init(&m_impl->h); }
Hasher::~Hasher() = default;
Hasher::Hasher(Hasher&&) noexcept = default;
Hasher& Hasher::operator=(Hasher&&) noexcept = default;

void Hasher::update(const void* data, size_t len) { blake3_hasher_update(&m_impl->h, data, len); }

namespace {
// Zeros for holes: large enough for BLAKE3's SIMD tree hashing to reach full speed.
constexpr size_t k_zero_block = 256 * 1024;
alignas(64) const unsigned char k_zeros[k_zero_block] = {};
} // namespace

void Hasher::update_zeros(std::uint64_t n) {
    while (n > 0) {
        size_t len = static_cast<size_t>(std::min<std::uint64_t>(n, k_zero_block));
        blake3_hasher_update(&m_impl->h, k_zeros, len);
        n -= len;
    }
}

Digest Hasher::finish() const {
    Digest d;
    blake3_hasher_finalize(&m_impl->h, d.bytes.data(), d.bytes.size());
    return d;
}

void init() noexcept {
    static std::once_flag once;
    // Hashing one byte takes the library through its dispatcher, which caches the CPU features: every
    // thread that starts (or calls init()) after this sees the cached value and never writes it.
    std::call_once(once, [] {
        blake3_hasher h;
        blake3_hasher_init(&h);
        blake3_hasher_update(&h, "", 1);
        std::uint8_t out[32];
        blake3_hasher_finalize(&h, out, sizeof out);
    });
}

// Before main(), on the only thread there is: no worker can hash before the probe is cached.
[[maybe_unused]] static const bool k_probed_at_load = (init(), true);

Digest hash_bytes(std::string_view data) {
    Hasher h;
    h.update(data.data(), data.size());
    return h.finish();
}

namespace {

/// Reads [off, end) of fd (stopping early at EOF) into the hasher; returns the bytes read.
std::uint64_t hash_range(int fd, Hasher& h, std::vector<char>& buf, std::uint64_t off, std::uint64_t end,
                         const std::string& display) {
    std::uint64_t total = 0;
    while (off < end) {
        size_t want = static_cast<size_t>(std::min<std::uint64_t>(buf.size(), end - off));
        ssize_t n = ::pread(fd, buf.data(), want, static_cast<off_t>(off));
        if (n < 0) {
            if (errno == EINTR) continue;
            util::throw_errno("read failed", display);
        }
        if (n == 0) break;
        h.update(buf.data(), static_cast<size_t>(n));
        off += static_cast<std::uint64_t>(n);
        total += static_cast<std::uint64_t>(n);
    }
    return total;
}

} // namespace

Digest hash_fd(int fd, const std::string& display, std::uint64_t* bytes_read) {
    // 256 KiB: large enough for BLAKE3's SIMD tree hashing to reach full speed, small enough that
    // many concurrent readers stay within a few MiB.
    constexpr size_t k_buffer = 256 * 1024;
    std::vector<char> buf(k_buffer);
    Hasher h;
    std::uint64_t total = 0;
    // A file with holes: its data extents are read, its holes hashed as zeros, up to the size it had
    // when we started; whatever lies beyond (a file that grew) is read by the loop below as usual.
    struct stat st {};
    off_t start = ::lseek(fd, 0, SEEK_CUR);
    if (start >= 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        static_cast<std::uint64_t>(st.st_blocks) * 512 < static_cast<std::uint64_t>(st.st_size)) {
        const auto size = static_cast<std::uint64_t>(st.st_size);
        auto off = static_cast<std::uint64_t>(start);
        bool short_read = false;
        while (off < size && !short_read) {
            off_t d = ::lseek(fd, static_cast<off_t>(off), SEEK_DATA);
            std::uint64_t data = d >= 0 ? static_cast<std::uint64_t>(d) : size; // ENXIO: a hole to the end
            if (d < 0 && errno != ENXIO) break; // no SEEK_DATA here: read the rest
            data = std::min(data, size);
            h.update_zeros(data - off);
            total += data - off;
            off = data;
            if (off >= size) break;
            off_t e = ::lseek(fd, static_cast<off_t>(off), SEEK_HOLE);
            std::uint64_t end = e > d ? std::min<std::uint64_t>(static_cast<std::uint64_t>(e), size) : size;
            std::uint64_t n = hash_range(fd, h, buf, off, end, display);
            short_read = n < end - off; // shrank meanwhile: the caller sees the count
            off += n;
            total += n;
        }
        if (::lseek(fd, static_cast<off_t>(off), SEEK_SET) < 0) util::throw_errno("seek failed", display);
    }
    for (;;) {
        ssize_t n = ::read(fd, buf.data(), buf.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            util::throw_errno("read failed", display);
        }
        if (n == 0) break;
        h.update(buf.data(), static_cast<size_t>(n));
        total += static_cast<std::uint64_t>(n);
    }
    if (bytes_read) *bytes_read = total;
    return h.finish();
}

} // namespace casmig::hash
