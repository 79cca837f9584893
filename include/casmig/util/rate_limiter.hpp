// casmig::util — a token bucket shared by threads, bounding bytes per second (--io-limit).
#pragma once
#include <chrono>
#include <cstdint>
#include <mutex>

namespace casmig::util {

class RateLimiter {
public:
    /// bytes_per_second == 0 means unlimited. The bucket holds at most one second of tokens.
    explicit RateLimiter(std::uint64_t bytes_per_second);
    /// Blocks the calling thread until `bytes` may be consumed.
    void acquire(std::uint64_t bytes);
    bool limited() const { return m_rate > 0; }

private:
    std::uint64_t m_rate;
    std::mutex m_mutex;
    double m_tokens;
    std::chrono::steady_clock::time_point m_last;
};

} // namespace casmig::util
