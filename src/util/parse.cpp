#include "casmig/util/parse.hpp"

#include "casmig/util/error.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>

namespace casmig::util {

static double leading_number(const std::string& text, size_t& pos, const char* what) {
    pos = 0;
    while (pos < text.size() && (std::isdigit(static_cast<unsigned char>(text[pos])) || text[pos] == '.')) ++pos;
    if (pos == 0) throw UsageError(std::string("invalid ") + what + " '" + text + "': expected a number with an optional unit");
    try {
        return std::stod(text.substr(0, pos));
    } catch (...) {
        throw UsageError(std::string("invalid ") + what + " '" + text + "'");
    }
}

std::chrono::milliseconds parse_duration(const std::string& text) {
    size_t pos = 0;
    double v = leading_number(text, pos, "duration");
    std::string unit = text.substr(pos);
    double mult;
    if (unit.empty() || unit == "s") mult = 1000;
    else if (unit == "ms") mult = 1;
    else if (unit == "m" || unit == "min") mult = 60'000;
    else if (unit == "h") mult = 3'600'000;
    else if (unit == "d") mult = 86'400'000;
    else throw UsageError("invalid duration '" + text + "': use a number with s, m, h or d (e.g. 90s, 30m, 2h)");
    return std::chrono::milliseconds(static_cast<long long>(std::llround(v * mult)));
}

std::uint64_t parse_bytes(const std::string& text) {
    size_t pos = 0;
    double v = leading_number(text, pos, "size");
    std::string unit = text.substr(pos);
    if (unit.size() > 1 && (unit.back() == 'B' || unit.back() == 'b')) unit.pop_back();
    if (unit.size() == 2 && unit[1] == 'i') unit.pop_back();
    if (unit.size() == 2 && unit[1] == '/') unit.pop_back();
    double mult;
    if (unit.empty()) mult = 1;
    else {
        switch (std::toupper(static_cast<unsigned char>(unit[0]))) {
        case 'K': mult = 1024.0; break;
        case 'M': mult = 1024.0 * 1024; break;
        case 'G': mult = 1024.0 * 1024 * 1024; break;
        case 'T': mult = 1024.0 * 1024 * 1024 * 1024; break;
        default: throw UsageError("invalid size '" + text + "': use a number with K, M, G or T (e.g. 50M)");
        }
        if (unit.size() > 1) throw UsageError("invalid size '" + text + "': use a number with K, M, G or T (e.g. 50M)");
    }
    return static_cast<std::uint64_t>(std::llround(v * mult));
}

std::string human_bytes(double bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int u = 0;
    bool neg = bytes < 0;
    if (neg) bytes = -bytes;
    while (bytes >= 1024 && u < 5) {
        bytes /= 1024;
        ++u;
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, u == 0 ? "%s%.0f %s" : "%s%.1f %s", neg ? "-" : "", bytes, units[u]);
    return buf;
}

} // namespace casmig::util
