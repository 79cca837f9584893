// casmig::util — how many worker threads a parallel step uses.
#pragma once
#include <thread>

namespace casmig::util {

/// `requested` (from -j) if non-zero, else the number of cores (2 if unknown).
inline unsigned thread_count(unsigned requested) {
    if (requested) return requested;
    unsigned n = std::thread::hardware_concurrency();
    return n ? n : 2;
}

} // namespace casmig::util
