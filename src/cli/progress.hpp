// casmig CLI — draws the library's progress reports as one line on stderr.
#pragma once
#include <chrono>
#include <string>

#include "casmig/progress.hpp"

namespace casmig::cli {

class ProgressBar {
public:
    explicit ProgressBar(bool enabled) : m_enabled(enabled), m_start(std::chrono::steady_clock::now()) {}
    ~ProgressBar() { finish(); }
    /// Draws at most ten times a second.
    void update(const Progress& p);
    /// Clears the line.
    void finish();
    /// Prints a line above the bar (problems), keeping the bar intact.
    void println(const std::string& line);
    bool enabled() const { return m_enabled; }

private:
    bool m_enabled;
    bool m_drawn = false;
    std::string m_phase;
    std::chrono::steady_clock::time_point m_start, m_phase_start, m_last;
};

} // namespace casmig::cli
