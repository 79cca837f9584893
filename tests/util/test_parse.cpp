#include <doctest/doctest.h>

#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/util/rate_limiter.hpp"

#include <chrono>

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
    TEST_CASE("printable keeps one line and valid UTF-8") {
        CHECK(printable("plain") == "plain");
        CHECK(printable("new\nline") == "new\\x0aline");
        CHECK(printable(std::string("bad\xff\xfe", 5)) == "bad\\xff\\xfe");
        CHECK(printable("\xc3\xbcnic") == "\xc3\xbcnic");
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
