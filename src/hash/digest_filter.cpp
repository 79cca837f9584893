#include "casmig/hash/digest_filter.hpp"

#include <cstring>

namespace casmig::hash {

namespace {
// A BLAKE3 digest is uniformly distributed: its four 64-bit words are four independent bit positions.
constexpr int k_probes = 4;

std::uint64_t word_of(const Digest& d, int i) noexcept {
    std::uint64_t w;
    std::memcpy(&w, d.bytes.data() + 8 * i, sizeof w);
    return w;
}
} // namespace

DigestFilter::DigestFilter(size_t bytes) {
    size_t words = 8;
    while (words * 2 * sizeof(std::uint64_t) <= bytes) words *= 2;
    m_words = std::make_unique<std::atomic<std::uint64_t>[]>(words);
    for (size_t i = 0; i < words; ++i) m_words[i].store(0, std::memory_order_relaxed);
    m_bit_mask = static_cast<std::uint64_t>(words) * 64 - 1;
}

void DigestFilter::add(const Digest& d) noexcept {
    for (int i = 0; i < k_probes; ++i) {
        const std::uint64_t bit = word_of(d, i) & m_bit_mask;
        m_words[bit >> 6].fetch_or(std::uint64_t{1} << (bit & 63), std::memory_order_release);
    }
}

bool DigestFilter::maybe_contains(const Digest& d) const noexcept {
    for (int i = 0; i < k_probes; ++i) {
        const std::uint64_t bit = word_of(d, i) & m_bit_mask;
        if (!(m_words[bit >> 6].load(std::memory_order_acquire) & (std::uint64_t{1} << (bit & 63)))) return false;
    }
    return true;
}

} // namespace casmig::hash
