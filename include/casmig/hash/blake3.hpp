// casmig::hash — BLAKE3-256 digests of uncompressed content, streamed over fixed buffers.
// An object's name is the lowercase hex of this digest (64 characters).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace casmig::hash {

struct Digest {
    std::array<std::uint8_t, 32> bytes{};
    std::string hex() const;
    /// Parses 64 lowercase or uppercase hex digits; nullopt otherwise.
    static std::optional<Digest> from_hex(std::string_view hex);
    std::string_view raw() const { return {reinterpret_cast<const char*>(bytes.data()), bytes.size()}; }
    static Digest from_raw(std::string_view raw); // raw.size() must be 32
    bool operator==(const Digest&) const = default;
    auto operator<=>(const Digest&) const = default;
};

struct DigestHash {
    size_t operator()(const Digest& d) const noexcept {
        size_t h;
        static_assert(sizeof h <= 32);
        __builtin_memcpy(&h, d.bytes.data(), sizeof h); // the digest is already uniformly distributed
        return h;
    }
};

/// Incremental BLAKE3 hasher (wraps the official C implementation, SIMD dispatched at run time).
class Hasher {
public:
    Hasher();
    ~Hasher();
    Hasher(Hasher&&) noexcept;
    Hasher& operator=(Hasher&&) noexcept;
    void update(const void* data, size_t len);
    /// update() with n zero bytes, from a shared zero buffer (a hole of a sparse file is hashed
    /// without being read: reading a hole costs the kernel a page-cache page per 4 KiB).
    void update_zeros(std::uint64_t n);
    Digest finish() const;

private:
    struct Impl;
    std::unique_ptr<Impl> m_impl;
};

/// Runs the BLAKE3 library's CPU-feature probe (CPUID, to pick SSE4.1/AVX2/AVX-512 code). The C library
/// probes lazily, on the first hash, into a plain global: two threads hashing first at once race on
/// it (ThreadSanitizer reports it). init() probes once, under std::call_once; it runs by itself before
/// main() (a static initializer of this library), and main() and the code that starts worker threads
/// may call it again for clarity: every call after the first is free. Never throws.
void init() noexcept;

/// Digest of an in-memory buffer.
Digest hash_bytes(std::string_view data);
/// Streams an open file from its current offset to EOF through a fixed buffer. Throws SystemError.
/// `bytes_read` receives the count (holes included). A regular file with holes (fewer blocks
/// allocated than its size) has its holes hashed as the zeros they read as, without reading them
/// (SEEK_DATA/SEEK_HOLE, where the filesystem supports them; see docs/design.md, "Sparse files").
Digest hash_fd(int fd, const std::string& display, std::uint64_t* bytes_read = nullptr);

} // namespace casmig::hash
