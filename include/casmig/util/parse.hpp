// casmig::util — parsing of user-typed quantities.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace casmig::util {

/// "90s", "30m", "2h", "1d", "250ms", "45" (seconds). Throws UsageError on anything else.
std::chrono::milliseconds parse_duration(const std::string& text);
/// "50M", "1.5G", "4096", "10k", "20MiB" as bytes (K/M/G/T are powers of 1024). Throws UsageError.
std::uint64_t parse_bytes(const std::string& text);
/// 1536 -> "1.5 KiB"
std::string human_bytes(double bytes);

} // namespace casmig::util
