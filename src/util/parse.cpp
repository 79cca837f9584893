#include "casmig/util/parse.hpp"

#include "casmig/util/error.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdint>
#include <cmath>
#include <cstdio>

namespace casmig::util {

static double leading_number(const std::string& text, size_t& pos, const char* what) {
    pos = 0;
    while (pos < text.size() && (std::isdigit(static_cast<unsigned char>(text[pos])) || text[pos] == '.')) ++pos;
    if (pos == 0) throw UsageError(std::string("invalid ") + what + " '" + text + "': expected a number with an optional unit");
    const std::string digits = text.substr(0, pos);
    size_t used = 0;
    double v = 0;
    try {
        v = std::stod(digits, &used);
    } catch (...) {
        used = 0;
    }
    // "1.2.3" would otherwise read as 1.2; stod's "inf" and "nan" cannot get here (digits and dots only).
    if (used != digits.size() || !std::isfinite(v)) throw UsageError(std::string("invalid ") + what + " '" + text + "'");
    return v;
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
    // Checked in floating point, before any conversion: a huge value must not wrap to a small one.
    const double ms = std::round(v * mult);
    if (ms > static_cast<double>(k_max_duration.count()) || (v > 0 && ms < 1))
        throw UsageError("invalid duration '" + text + "': accepted are 0 and 1ms to " +
                         std::to_string(k_max_duration.count() / 86'400'000) + "d");
    return std::chrono::milliseconds(static_cast<long long>(ms));
}

// 1048576 -> "1M": the largest unit that divides exactly, in parse_bytes()'s own notation.
static std::string size_text(std::uint64_t n) {
    const char* units = "KMGT";
    int u = -1;
    while (u < 3 && n != 0 && n % 1024 == 0) {
        n /= 1024;
        ++u;
    }
    return std::to_string(n) + (u >= 0 ? std::string(1, units[u]) : std::string());
}

std::uint64_t parse_bytes(const std::string& text, std::uint64_t min, std::uint64_t max) {
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
    // Range-checked in floating point before the conversion (2^64 and above would be undefined).
    const double bytes = std::floor(v * mult);
    if (bytes < static_cast<double>(min) || bytes >= 18446744073709551616.0 ||
        static_cast<std::uint64_t>(bytes) > max)
        throw UsageError("invalid size '" + text + "': accepted are " + size_text(min) + " to " + size_text(max) +
                         " bytes");
    return static_cast<std::uint64_t>(bytes);
}

std::uint64_t parse_count(const std::string& text, std::uint64_t min, std::uint64_t max, const std::string& what) {
    std::uint64_t v = 0;
    const char* end = text.data() + text.size();
    auto [p, ec] = std::from_chars(text.data(), end, v);
    const bool digits_only = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c)) != 0;
    });
    if (!digits_only || ec != std::errc() || p != end || v < min || v > max)
        throw UsageError("invalid " + what + " '" + text + "': expected a whole number from " + std::to_string(min) +
                         " to " + std::to_string(max));
    return v;
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
