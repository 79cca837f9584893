// casmig::util — a request to stop at the next safe point (the command line's SIGINT and SIGTERM).
//
// The command line's signal handler calls request_stop() (async-signal-safe: one lock-free atomic
// store) and nothing else; long-running loops (migrate's walk stage, verify's, cleanup's and
// rollback's per-package work, convert's shards, add's groups, a lock wait) call stop_requested()
// where they would start new work and, when it is set, start none: what is in flight finishes and is
// committed, staged files are removed as after any run, and the result says the run was interrupted.
// The C library never calls request_stop() (a package manager owns its process's signals), so there
// the flag stays 0. util depends on nothing specific to casmig.
#pragma once
#include <string>

#include "casmig/util/error.hpp"

namespace casmig::util {

/// The signal number that asked the running command to stop (the first one), or 0.
int stop_signal() noexcept;
inline bool stop_requested() noexcept { return stop_signal() != 0; }
/// Records sig as the reason to stop, if none is recorded yet. Async-signal-safe.
void request_stop(int sig) noexcept;
/// Forgets a recorded stop (unit tests).
void clear_stop() noexcept;
/// "SIGINT", "SIGTERM", or "signal N".
std::string signal_name(int sig);

/// A stop requested while nothing was done yet (e.g. during a lock wait): the command line exits
/// 128 + signal().
class InterruptedError : public Error {
public:
    InterruptedError(const std::string& msg, int sig) : Error(msg), m_signal(sig) {}
    int signal() const noexcept { return m_signal; }

private:
    int m_signal;
};

} // namespace casmig::util
