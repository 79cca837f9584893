// casmig::hash::DigestFilter — a fixed-size Bloom filter of digests, shared by threads.
//
// migrate of a store whose catalog held no object when the run began asks it before the catalog: a
// content no batch of this run has committed cannot be in the catalog, and most contents of a first
// migration are new — each "no" saves a SQLite lookup (a read transaction, a B-tree descent). It is
// never a false "no" for a digest that was added; a "maybe" is answered by the catalog as before, so
// a filter that is full (many millions of digests) costs lookups, never a wrong answer. Memory is
// fixed at construction (1 MiB by default: under 1% false "maybe" up to ~500k digests).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "casmig/hash/blake3.hpp"

namespace casmig::hash {

class DigestFilter {
public:
    /// bytes: rounded down to a power of two, at least 64.
    explicit DigestFilter(size_t bytes = size_t{1} << 20);
    /// After add(d) returns, maybe_contains(d) is true in every thread that synchronized with this one.
    void add(const Digest& d) noexcept;
    bool maybe_contains(const Digest& d) const noexcept;

private:
    std::unique_ptr<std::atomic<std::uint64_t>[]> m_words;
    std::uint64_t m_bit_mask = 0; // number of bits - 1
};

} // namespace casmig::hash
