#include <doctest/doctest.h>

#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/util/rate_limiter.hpp"

#include <chrono>
#include <random>

using namespace casmig::util;

TEST_SUITE("util::parse") {
    TEST_CASE("parse_duration accepts the units the contract names") {
        CHECK(parse_duration("90s").count() == 90'000);
        CHECK(parse_duration("30m").count() == 1'800'000);
        CHECK(parse_duration("2h").count() == 7'200'000);
        CHECK(parse_duration("0s").count() == 0);
        CHECK(parse_duration("45").count() == 45'000);
        CHECK(parse_duration("1.5m").count() == 90'000);
        CHECK_THROWS_AS(parse_duration("soon"), UsageError);
        CHECK_THROWS_AS(parse_duration("10y"), UsageError);
    }
    TEST_CASE("parse_bytes reads binary units") {
        CHECK(parse_bytes("50M") == 50ull << 20);
        CHECK(parse_bytes("4096") == 4096);
        CHECK(parse_bytes("10k") == 10240);
        CHECK(parse_bytes("1G") == 1ull << 30);
        CHECK(parse_bytes("20MiB") == 20ull << 20);
        CHECK(parse_bytes("1.5K") == 1536);
        CHECK_THROWS_AS(parse_bytes("fast"), UsageError);
        CHECK_THROWS_AS(parse_bytes("5X"), UsageError);
    }
    TEST_CASE("parse_duration refuses what it cannot represent instead of wrapping or rounding to 0") {
        CHECK_THROWS_AS(parse_duration("99999999999999999999999d"), UsageError); // wrapped to 0 before
        CHECK_THROWS_AS(parse_duration("3651d"), UsageError);
        CHECK(parse_duration("3650d") == k_max_duration);
        CHECK_THROWS_AS(parse_duration("0.0004s"), UsageError); // would be 0: "no time at all"
        CHECK(parse_duration("0.5ms").count() == 1);
        CHECK_THROWS_AS(parse_duration("1.2.3s"), UsageError); // read as 1.2s before
        try {
            parse_duration("99999999999999999999999d");
        } catch (const UsageError& e) {
            CHECK(std::string(e.what()).find("3650d") != std::string::npos); // the message names the range
        }
    }
    TEST_CASE("parse_bytes keeps to its range and never rounds up to it") {
        CHECK(parse_bytes("0") == 0);
        CHECK(parse_bytes("0.3K") == 307);
        CHECK_THROWS_AS(parse_bytes("0.4", 1), UsageError); // was 0: unlimited
        CHECK_THROWS_AS(parse_bytes("0.5", 1), UsageError); // was 1 B/s
        CHECK(parse_bytes("1", 1) == 1);
        CHECK_THROWS_AS(parse_bytes("99999999999T"), UsageError); // beyond 2^64
        CHECK(parse_bytes("1024T", 1, 1ull << 50) == 1ull << 50);
        CHECK_THROWS_AS(parse_bytes("1025T", 1, 1ull << 50), UsageError);
        try {
            parse_bytes("0.5", 1, 1ull << 50);
        } catch (const UsageError& e) {
            CHECK(std::string(e.what()).find("1 to 1024T") != std::string::npos);
        }
    }
    TEST_CASE("parse_count takes whole numbers within the range only") {
        CHECK(parse_count("7", 1, 10, "--limit") == 7);
        CHECK(parse_count("0", 0, 10, "--journal") == 0);
        for (const char* bad : {"0", "11", "-1", "+3", "1.5", "1e3", "", " 5", "99999999999999999999999"}) {
            CAPTURE(bad);
            CHECK_THROWS_AS(parse_count(bad, 1, 10, "--limit"), UsageError);
        }
        try {
            parse_count("0", 1, 10, "--limit");
        } catch (const UsageError& e) {
            CHECK(std::string(e.what()) == "invalid --limit '0': expected a whole number from 1 to 10");
        }
    }
    TEST_CASE("printable keeps one line and valid UTF-8") {
        CHECK(printable("plain") == "plain");
        CHECK(printable("new\nline") == "new\\x0aline");
        CHECK(printable(std::string("bad\xff\xfe", 5)) == "bad\\xff\\xfe");
        CHECK(printable("\xc3\xbcnic") == "\xc3\xbcnic");
        CHECK(printable("\xf0\x9f\x98\x80") == "\xf0\x9f\x98\x80"); // U+1F600 stays
    }
    TEST_CASE("printable escapes every byte that is not well-formed printable UTF-8") {
        // Each of these passed through before and made `--json` output invalid (nlohmann refuses it).
        CHECK(printable("\xf8\x80\x80") == "\\xf8\\x80\\x80");         // no such lead byte
        CHECK(printable("\xe0\x80\xaf") == "\\xe0\\x80\\xaf");         // overlong '/'
        CHECK(printable("\xed\xa0\x80") == "\\xed\\xa0\\x80");         // a UTF-16 surrogate
        CHECK(printable("\xf4\x90\x80\x80") == "\\xf4\\x90\\x80\\x80"); // above U+10FFFF
        CHECK(printable("a\xc2\x85" "b") == "a\\xc2\\x85b");            // C1 control NEL
        CHECK(printable("\xc2\xa0") == "\xc2\xa0");                     // U+00A0 stays
    }
    TEST_CASE("unprintable reads back what printable wrote, for any bytes") {
        CHECK(unprintable("bad\\xff\\xFE") == std::string("bad\xff\xfe", 5));
        CHECK(unprintable("a\\x5cb") == std::string("a\\b"));
        CHECK(unprintable("plain") == std::string("plain"));
        CHECK_FALSE(unprintable("a\\b").has_value());   // a backslash that starts no \xNN
        CHECK_FALSE(unprintable("a\\x4").has_value());  // cut short
        CHECK_FALSE(unprintable("a\\xg0").has_value()); // not hex
        std::mt19937 rng(7);
        for (int n = 0; n < 2000; ++n) {
            std::string b(rng() % 12, '\0');
            for (auto& c : b) c = static_cast<char>(rng() % 4 == 0 ? '\\' : rng() % 256);
            auto back = unprintable(printable(b));
            REQUIRE(back.has_value());
            CHECK(*back == b);
        }
    }
    TEST_CASE("RateLimiter bounds throughput") {
        RateLimiter l(1 << 20); // 1 MiB/s with a 1 MiB bucket
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 6; ++i) l.acquire(256 << 10); // 1.5 MiB: the bucket covers 1 MiB
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        CHECK(s >= 0.4);
        CHECK(s < 3.0);
    }
}
