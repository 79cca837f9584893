// casmig CLI — draws the library's progress reports on stderr: on a terminal, one line redrawn in
// place that always fits its width; elsewhere (--progress always into a log, journald), one plain line
// every few seconds. Each phase ends with a summary line (what it did, how fast).
#pragma once
#include <chrono>
#include <string>

#include "casmig/progress.hpp"

namespace casmig::cli {

class ProgressBar {
public:
    enum class Style { off, redraw, log };
    explicit ProgressBar(Style style) : m_style(style), m_start(std::chrono::steady_clock::now()) {}
    ~ProgressBar() { finish(); }
    /// Draws at most ten times a second (redraw) or every k_log_every (log).
    void update(const Progress& p);
    /// Ends the current phase: its summary line, and the bar cleared.
    void finish();
    /// Prints a line above the bar (problems), keeping the bar intact.
    void println(const std::string& line);
    bool enabled() const { return m_style != Style::off; }
    /// The line update() would draw for p at this width (pure: the tests' and the bar's one formatter).
    static std::string render(const Progress& p, double phase_seconds, std::size_t width);
    static constexpr std::chrono::seconds k_log_every{5};

private:
    void summary();
    Style m_style;
    bool m_drawn = false;
    Progress m_last_seen;
    bool m_seen = false;
    std::chrono::steady_clock::time_point m_start, m_phase_start, m_last;
};

} // namespace casmig::cli
