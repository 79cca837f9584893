#include "casmig/util/suggest.hpp"

#include <algorithm>

namespace casmig::util {

std::size_t edit_distance(std::string_view a, std::string_view b) {
    // Three rows of the dynamic-programming table: the transposition looks two rows back.
    std::vector<std::size_t> back2(b.size() + 1), back(b.size() + 1), cur(b.size() + 1);
    for (std::size_t j = 0; j <= b.size(); ++j) back[j] = j;
    for (std::size_t i = 1; i <= a.size(); ++i) {
        cur[0] = i;
        for (std::size_t j = 1; j <= b.size(); ++j) {
            const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            cur[j] = std::min({back[j] + 1, cur[j - 1] + 1, back[j - 1] + cost});
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
                cur[j] = std::min(cur[j], back2[j - 2] + 1);
        }
        std::swap(back2, back);
        std::swap(back, cur);
    }
    return back[b.size()];
}

std::optional<std::string> closest(std::string_view word, const std::vector<std::string>& candidates) {
    if (word.empty()) return std::nullopt;
    const std::size_t limit = std::clamp<std::size_t>(word.size() / 3, 1, 3);
    const std::string* best = nullptr;
    std::size_t best_distance = limit + 1;
    for (const auto& c : candidates) {
        if (c == word) return std::nullopt;
        const std::size_t d = edit_distance(word, c);
        if (d < best_distance) {
            best = &c;
            best_distance = d;
        }
    }
    if (best) return *best;
    if (word.size() < 2) return std::nullopt;
    const std::string* prefixed = nullptr;
    for (const auto& c : candidates) {
        if (c.size() > word.size() && c.compare(0, word.size(), word) == 0) {
            if (prefixed) return std::nullopt; // ambiguous ("re": remove or rebuild-catalog)
            prefixed = &c;
        }
    }
    if (prefixed) return *prefixed;
    return std::nullopt;
}

} // namespace casmig::util
