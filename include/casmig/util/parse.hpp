// casmig::util — parsing of user-typed quantities.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace casmig::util {

/// Longest duration parse_duration() accepts: ten years.
inline constexpr std::chrono::milliseconds k_max_duration{3650LL * 86'400'000};
/// "90s", "30m", "2h", "1d", "250ms", "45" (seconds), rounded to the millisecond. Accepts 0 and 1ms to
/// k_max_duration; throws UsageError naming that range on anything else (a non-zero value below 1ms
/// included: it would silently become 0).
std::chrono::milliseconds parse_duration(const std::string& text);
/// "50M", "1.5G", "4096", "10k", "20MiB" as bytes (K/M/G/T are powers of 1024); a fraction of a byte is
/// dropped ("0.3K" = 307). Throws UsageError, naming the accepted range, on anything else and on a
/// result outside [min, max] (so "0.5" with min 1 is refused, never rounded up or down to a limit).
std::uint64_t parse_bytes(const std::string& text, std::uint64_t min = 0, std::uint64_t max = UINT64_MAX);
/// A whole decimal number from min to max ("12"; no sign, no fraction, no exponent). `what` names the
/// option in the message. Throws UsageError naming the accepted range.
std::uint64_t parse_count(const std::string& text, std::uint64_t min, std::uint64_t max, const std::string& what);
/// 1536 -> "1.5 KiB"
std::string human_bytes(double bytes);

} // namespace casmig::util
