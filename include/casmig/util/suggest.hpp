// casmig::util — "did you mean …?": the closest of a few known words to a mistyped one.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace casmig::util {

/// Edits (insert, delete, substitute one byte, or swap two adjacent bytes) that turn a into b: the
/// optimal-string-alignment distance, so a transposed pair ("stauts") costs 1, not 2.
std::size_t edit_distance(std::string_view a, std::string_view b);

/// The candidate a user most likely meant by `word`: the nearest by edit_distance() if it is close
/// enough to be a typo (at most a third of the word's length, at least 1 and at most 3 edits), else the
/// only candidate that `word` (2 bytes or more) begins ("mig" for "migrate"). Ties go to the earlier
/// candidate. nullopt when nothing is plausible, or when `word` is itself a candidate.
std::optional<std::string> closest(std::string_view word, const std::vector<std::string>& candidates);

} // namespace casmig::util
