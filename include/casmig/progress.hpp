// casmig — progress reporting. The library reports, the CLI draws; nothing in src/ (but src/cli)
// writes to the terminal.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace casmig {

struct Progress {
    std::string phase;                 // "migrate", "verify", "plan", "cleanup", ...
    std::uint64_t packages_done = 0, packages_total = 0;
    std::uint64_t files_done = 0;
    std::uint64_t bytes_done = 0, bytes_total = 0; // bytes_total 0: unknown
    const char* unit = "pkgs";         // what packages_done counts ("objects", "shards" in some phases)
};

/// Called from one thread at a time, often; it should be cheap (the CLI rate-limits drawing).
using ProgressSink = std::function<void(const Progress&)>;

/// A problem found by a command, reported as it is found: one line naming the package and path.
struct Problem {
    std::string package; // printable package id
    std::string path;    // printable path inside the package ("" for the package itself)
    std::string message;
    bool warning = false; // something was found and put right (repaired, moved aside): no failure
    /// "package ID: PATH: MESSAGE"; a problem of the store itself (package "-") is "store: PATH: MESSAGE".
    std::string line() const {
        return (package == "-" ? std::string("store") : "package " + package) + (path.empty() ? "" : ": " + path) + ": " + message;
    }
};
using ProblemSink = std::function<void(const Problem&)>;

} // namespace casmig
