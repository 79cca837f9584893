#include "casmig/util/rate_limiter.hpp"

#include <algorithm>
#include <thread>

namespace casmig::util {

RateLimiter::RateLimiter(std::uint64_t bytes_per_second)
    : m_rate(bytes_per_second), m_tokens(static_cast<double>(bytes_per_second)), m_last(std::chrono::steady_clock::now()) {}

void RateLimiter::acquire(std::uint64_t bytes) {
    if (m_rate == 0 || bytes == 0) return;
    std::chrono::duration<double> wait{};
    {
        std::lock_guard lk(m_mutex);
        auto now = std::chrono::steady_clock::now();
        double elapsed = std::chrono::duration<double>(now - m_last).count();
        m_last = now;
        m_tokens = std::min(static_cast<double>(m_rate), m_tokens + elapsed * static_cast<double>(m_rate));
        // Go into debt and sleep it off: a request larger than the bucket still gets through.
        m_tokens -= static_cast<double>(bytes);
        if (m_tokens < 0) wait = std::chrono::duration<double>(-m_tokens / static_cast<double>(m_rate));
    }
    if (wait.count() > 0) std::this_thread::sleep_for(wait);
}

} // namespace casmig::util
