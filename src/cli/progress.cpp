#include "progress.hpp"

#include "casmig/util/parse.hpp"

#include <cstdio>

namespace casmig::cli {

void ProgressBar::update(const Progress& p) {
    if (!m_enabled) return;
    auto now = std::chrono::steady_clock::now();
    if (p.phase != m_phase) {
        m_phase = p.phase;
        m_phase_start = now;
    }
    bool final = p.packages_total && p.packages_done == p.packages_total;
    if (!final && now - m_last < std::chrono::milliseconds(100)) return;
    m_last = now;
    double secs = std::chrono::duration<double>(now - m_phase_start).count();
    double rate = secs > 0 ? static_cast<double>(p.bytes_done) / secs : 0;
    std::string eta = "--:--";
    if (p.packages_done > 0 && p.packages_total > p.packages_done && secs > 0.5) {
        double left = secs * static_cast<double>(p.packages_total - p.packages_done) / static_cast<double>(p.packages_done);
        char b[32];
        std::snprintf(b, sizeof b, "%d:%02d", static_cast<int>(left) / 60, static_cast<int>(left) % 60);
        eta = b;
    }
    int width = 24;
    int filled = p.packages_total ? static_cast<int>(width * p.packages_done / p.packages_total) : 0;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(width - filled), '.');
    std::fprintf(stderr, "\r\033[K%s [%s] %llu/%llu packages  %llu files  %s/s  ETA %s", p.phase.c_str(), bar.c_str(),
                 static_cast<unsigned long long>(p.packages_done), static_cast<unsigned long long>(p.packages_total),
                 static_cast<unsigned long long>(p.files_done), util::human_bytes(rate).c_str(), eta.c_str());
    std::fflush(stderr);
    m_drawn = true;
}

void ProgressBar::finish() {
    if (m_enabled && m_drawn) {
        std::fprintf(stderr, "\r\033[K");
        std::fflush(stderr);
        m_drawn = false;
    }
}

void ProgressBar::println(const std::string& line) {
    if (m_enabled && m_drawn) std::fprintf(stderr, "\r\033[K");
    std::fprintf(stderr, "%s\n", line.c_str());
    m_drawn = false;
}

} // namespace casmig::cli
