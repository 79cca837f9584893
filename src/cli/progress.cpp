#include "progress.hpp"

#include "casmig/util/parse.hpp"

#include <cstdio>
#include <cstdlib>
#include <sys/ioctl.h>
#include <unistd.h>
#include <vector>

namespace casmig::cli {

namespace {

std::size_t terminal_width() {
    struct winsize ws {};
    if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
    if (const char* c = std::getenv("COLUMNS"); c && std::atoi(c) > 0) return static_cast<std::size_t>(std::atoi(c));
    return 80;
}

std::string clock(double secs) {
    char b[32];
    const long s = static_cast<long>(secs);
    if (s >= 3600) std::snprintf(b, sizeof b, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    else std::snprintf(b, sizeof b, "%ld:%02ld", s / 60, s % 60);
    return b;
}

std::string count(std::uint64_t n) {
    std::string s = std::to_string(n);
    for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
    return s;
}

/// Bytes/s while bytes are being read; files/s in phases that report files only.
std::string rate(const Progress& p, double secs) {
    if (secs <= 0.05) return "";
    if (p.bytes_done) return util::human_bytes(static_cast<double>(p.bytes_done) / secs) + "/s";
    if (p.files_done) return count(static_cast<std::uint64_t>(static_cast<double>(p.files_done) / secs)) + " files/s";
    if (p.packages_done)
        return count(static_cast<std::uint64_t>(static_cast<double>(p.packages_done) / secs)) + " " + (p.unit ? p.unit : "pkgs") + "/s";
    return "";
}

} // namespace

std::string ProgressBar::render(const Progress& p, double secs, std::size_t width) {
    if (width < 2) return "";
    const std::size_t room = width - 1; // never the last column: some terminals wrap there
    const std::string unit = p.unit ? p.unit : "pkgs";
    std::string counts = p.packages_total ? count(p.packages_done) + "/" + count(p.packages_total) + " " + unit
                                          : count(p.packages_done) + " " + unit;
    std::string files = p.files_done ? count(p.files_done) + " files" : "";
    std::string r = rate(p, secs);
    std::string eta;
    if (p.packages_done > 0 && p.packages_total > p.packages_done && secs > 0.5)
        eta = "ETA " + clock(secs * static_cast<double>(p.packages_total - p.packages_done) / static_cast<double>(p.packages_done));
    // Segments by priority: the phase and the counts always; then rate, ETA, files, the bar; whatever
    // does not fit the width is left out, never wrapped.
    std::vector<std::string> parts = {p.phase, counts};
    auto fits = [&](const std::vector<std::string>& v, std::size_t extra) {
        std::size_t n = 0;
        for (const auto& s : v) n += s.size() + 1;
        return n + extra <= room + 1;
    };
    for (const std::string* s : {&r, &eta, &files})
        if (!s->empty() && fits(parts, s->size() + 1)) parts.push_back(*s);
    std::string line;
    for (const auto& s : parts) line += (line.empty() ? "" : " ") + s;
    // The bar takes what is left (at least 10 columns), after the phase name.
    std::size_t left = room > line.size() ? room - line.size() : 0;
    if (p.packages_total && left >= 13) {
        std::size_t w = std::min<std::size_t>(left - 3, 40);
        std::size_t filled = static_cast<std::size_t>(static_cast<double>(w) * static_cast<double>(p.packages_done) /
                                                      static_cast<double>(p.packages_total));
        std::string bar = "[" + std::string(filled, '#') + std::string(w - filled, '.') + "]";
        line = p.phase + " " + bar + line.substr(p.phase.size());
    }
    if (line.size() > room) line.resize(room);
    return line;
}

void ProgressBar::update(const Progress& p) {
    if (m_style == Style::off) return;
    auto now = std::chrono::steady_clock::now();
    if (!m_seen || p.phase != m_last_seen.phase) {
        if (m_seen) summary();
        m_phase_start = now;
        m_last = {};
    }
    m_last_seen = p;
    m_seen = true;
    const bool final = p.packages_total && p.packages_done == p.packages_total;
    const double secs = std::chrono::duration<double>(now - m_phase_start).count();
    if (m_style == Style::redraw) {
        if (!final && now - m_last < std::chrono::milliseconds(100)) return;
        m_last = now;
        std::fprintf(stderr, "\r\033[K%s", render(p, secs, terminal_width()).c_str());
        std::fflush(stderr);
        m_drawn = true;
        return;
    }
    // Log style: one line every k_log_every (the first after k_log_every, so short runs stay quiet).
    if (m_last == std::chrono::steady_clock::time_point{}) m_last = now;
    if (now - m_last < k_log_every) return;
    m_last = now;
    std::fprintf(stderr, "casmig: %s\n", render(p, secs, 200).c_str());
    std::fflush(stderr);
}

void ProgressBar::summary() {
    if (!m_seen) return;
    const Progress& p = m_last_seen;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - m_phase_start).count();
    if (m_drawn) std::fprintf(stderr, "\r\033[K");
    m_drawn = false;
    std::string line = "casmig: " + p.phase + " done: " + count(p.packages_done) + " " + (p.unit ? p.unit : "pkgs");
    if (p.files_done) line += ", " + count(p.files_done) + " files";
    if (p.bytes_done) line += ", " + util::human_bytes(static_cast<double>(p.bytes_done));
    line += " in " + clock(secs);
    if (std::string r = rate(p, secs); !r.empty()) line += " (" + r + ")";
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
}

void ProgressBar::finish() {
    if (m_style == Style::off) return;
    summary();
    m_seen = false;
}

void ProgressBar::println(const std::string& line) {
    if (m_drawn) std::fprintf(stderr, "\r\033[K");
    std::fprintf(stderr, "%s\n", line.c_str());
    m_drawn = false;
}

} // namespace casmig::cli
