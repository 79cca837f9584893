#include "casmig/util/interrupt.hpp"

#include <atomic>
#include <csignal>

namespace casmig::util {

namespace {
// Written from a signal handler: must be lock-free to be async-signal-safe.
std::atomic<int> g_stop{0};
static_assert(std::atomic<int>::is_always_lock_free);
} // namespace

int stop_signal() noexcept { return g_stop.load(std::memory_order_acquire); }

void request_stop(int sig) noexcept {
    int none = 0;
    g_stop.compare_exchange_strong(none, sig, std::memory_order_acq_rel);
}

void clear_stop() noexcept { g_stop.store(0, std::memory_order_release); }

std::string signal_name(int sig) {
    switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    default: return "signal " + std::to_string(sig);
    }
}

} // namespace casmig::util
