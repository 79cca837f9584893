// casmig::util — a growable byte buffer aligned for O_DIRECT I/O.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <sys/mman.h>

namespace casmig::util {

/// Alignment that satisfies O_DIRECT on every common block device (logical blocks of 512 or 4096 bytes).
inline constexpr size_t k_direct_align = 4096;

/// Scratch buffer whose start is k_direct_align-aligned. Growing it reallocates without copying:
/// callers refill it after reserve(). Buffers of k_map_min bytes or more (whole-file reads, up to
/// 8 MiB) are their own anonymous mappings, returned to the system when freed: through malloc, freeing
/// one would raise glibc's dynamic mmap threshold, after which every smaller allocation comes from the
/// heap arenas, whose fragmentation grew a 1M-file migrate's RSS by 30+ MiB over the run (issue 9).
class AlignedBuffer {
public:
    static constexpr size_t k_map_min = 256 * 1024;
    AlignedBuffer() = default;
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    ~AlignedBuffer() { release(); }
    char* data() const { return m_data; }
    size_t capacity() const { return m_capacity; }
    /// Makes room for at least n bytes (rounded up to the alignment); old contents are discarded.
    void reserve(size_t n) {
        if (n <= m_capacity && m_data) return;
        size_t cap = (n + k_direct_align - 1) / k_direct_align * k_direct_align;
        if (cap == 0) cap = k_direct_align;
        release();
        void* p;
        if (cap >= k_map_min) {
            p = ::mmap(nullptr, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) throw std::bad_alloc();
        } else {
            p = std::aligned_alloc(k_direct_align, cap);
            if (!p) throw std::bad_alloc();
        }
        m_data = static_cast<char*>(p);
        m_capacity = cap;
    }

private:
    void release() noexcept {
        if (!m_data) return;
        if (m_capacity >= k_map_min) ::munmap(m_data, m_capacity);
        else std::free(m_data);
        m_data = nullptr;
        m_capacity = 0;
    }
    char* m_data = nullptr;
    size_t m_capacity = 0;
};

} // namespace casmig::util
