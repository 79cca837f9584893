#include <doctest/doctest.h>

#include "casmig/util/suggest.hpp"

using namespace casmig::util;

TEST_SUITE("util::suggest") {
    TEST_CASE("edit_distance counts inserts, deletes, substitutions and adjacent swaps") {
        CHECK(edit_distance("", "") == 0);
        CHECK(edit_distance("migrate", "migrate") == 0);
        CHECK(edit_distance("migrat", "migrate") == 1);
        CHECK(edit_distance("migrate", "migrat") == 1);
        CHECK(edit_distance("migrxte", "migrate") == 1);
        CHECK(edit_distance("stauts", "status") == 1);
        CHECK(edit_distance("", "gc") == 2);
        CHECK(edit_distance("kitten", "sitting") == 3);
        CHECK(edit_distance("ca", "abc") == 3); // optimal string alignment: no edit of a swapped pair
    }
    TEST_CASE("closest suggests a near word, a unique prefix, or nothing") {
        const std::vector<std::string> commands{"plan",   "migrate",         "status", "verify",
                                                "remove", "rebuild-catalog", "gc"};
        CHECK(closest("migrat", commands) == std::optional<std::string>("migrate"));
        CHECK(closest("stauts", commands) == std::optional<std::string>("status"));
        CHECK(closest("gx", commands) == std::optional<std::string>("gc"));
        CHECK(closest("mig", commands) == std::optional<std::string>("migrate"));
        CHECK(closest("re", commands) == std::nullopt);         // remove or rebuild-catalog
        CHECK(closest("frobnicate", commands) == std::nullopt); // nothing close
        CHECK(closest("migrate", commands) == std::nullopt);    // not a typo
        CHECK(closest("", commands) == std::nullopt);
        CHECK(closest("limt", {"limit", "time-budget", "io-limit"}) == std::optional<std::string>("limit"));
    }
}
