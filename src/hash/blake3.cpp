#include "casmig/hash/blake3.hpp"

#include "casmig/util/error.hpp"

#include <blake3.h>
#include <cerrno>
#include <cstring>
#include <mutex>
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

Digest hash_fd(int fd, const std::string& display, std::uint64_t* bytes_read) {
    // 256 KiB: large enough for BLAKE3's SIMD tree hashing to reach full speed, small enough that
    // many concurrent readers stay within a few MiB.
    constexpr size_t k_buffer = 256 * 1024;
    std::vector<char> buf(k_buffer);
    Hasher h;
    std::uint64_t total = 0;
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
