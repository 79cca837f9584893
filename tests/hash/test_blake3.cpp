#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/hash/blake3.hpp"

#include <cstdio>
#include <fcntl.h>
#include <random>
#include <thread>
#include <vector>

using namespace casmig;

static std::string b3sum(const std::string& path) {
    std::string cmd = "b3sum --no-names '" + path + "'";
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[128] = "";
    std::string out = std::fgets(buf, sizeof buf, p) ? buf : "";
    ::pclose(p);
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
    return out;
}

TEST_SUITE("hash::Hasher") {
    TEST_CASE("digest of the empty input is BLAKE3's published value") {
        CHECK(hash::hash_bytes("").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }
    TEST_CASE("hash_fd matches b3sum at chunk and buffer boundaries") {
        test::TempDir t;
        std::mt19937_64 rng(42);
        for (size_t size : {size_t(0), size_t(1), size_t(1023), size_t(1024), size_t(1025), size_t(64 * 1024),
                            size_t(256 * 1024 + 7), size_t(3 * 1024 * 1024 + 11)}) {
            CAPTURE(size);
            std::string data(size, '\0');
            for (auto& c : data) c = static_cast<char>(rng());
            std::string path = t / ("f" + std::to_string(size));
            test::write_file(path, data);
            int fd = ::open(path.c_str(), O_RDONLY);
            std::uint64_t n = 0;
            auto d = hash::hash_fd(fd, path, &n);
            ::close(fd);
            CHECK(n == size);
            CHECK(d.hex() == b3sum(path));
            CHECK(hash::hash_bytes(data) == d);
        }
    }
    TEST_CASE("Digest hex round trip") {
        auto d = hash::hash_bytes("abc");
        auto back = hash::Digest::from_hex(d.hex());
        REQUIRE(back);
        CHECK(*back == d);
        CHECK_FALSE(hash::Digest::from_hex("xyz"));
        CHECK_FALSE(hash::Digest::from_hex(std::string(64, 'g')));
    }
    TEST_CASE("threads hashing at once agree with one thread") {
        // Run alone under ThreadSanitizer (tools/tsan), this is the process's first hash: without
        // hash::init() before main(), the threads race on BLAKE3's lazy CPU-feature probe.
        std::string data(64 * 1024 + 7, '\0');
        for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7 + 3);
        std::vector<hash::Digest> got(8);
        std::vector<std::thread> threads;
        for (size_t i = 0; i < got.size(); ++i) threads.emplace_back([&, i] { got[i] = hash::hash_bytes(data); });
        for (auto& t : threads) t.join();
        const auto want = hash::hash_bytes(data);
        for (const auto& d : got) CHECK(d == want);
    }
}
