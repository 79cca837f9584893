// casmig::util — a growable byte buffer aligned for O_DIRECT I/O.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace casmig::util {

/// Alignment that satisfies O_DIRECT on every common block device (logical blocks of 512 or 4096 bytes).
inline constexpr size_t k_direct_align = 4096;

/// Heap scratch buffer whose start is k_direct_align-aligned. Growing it reallocates without copying:
/// callers refill it after reserve().
class AlignedBuffer {
public:
    char* data() const { return m_data.get(); }
    size_t capacity() const { return m_capacity; }
    /// Makes room for at least n bytes (rounded up to the alignment); old contents are discarded.
    void reserve(size_t n) {
        if (n <= m_capacity && m_data) return;
        size_t cap = (n + k_direct_align - 1) / k_direct_align * k_direct_align;
        if (cap == 0) cap = k_direct_align;
        void* p = std::aligned_alloc(k_direct_align, cap);
        if (!p) throw std::bad_alloc();
        m_data.reset(static_cast<char*>(p));
        m_capacity = cap;
    }

private:
    struct Free {
        void operator()(char* p) const { std::free(p); }
    };
    std::unique_ptr<char, Free> m_data;
    size_t m_capacity = 0;
};

} // namespace casmig::util
