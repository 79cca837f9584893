#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/hash/blake3.hpp"

#include <cstdio>
#include <fcntl.h>
#include <random>
#include <sys/stat.h>
#include <unistd.h>
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
    TEST_CASE("hash_fd hashes holes as zeros: a sparse file and its dense copy agree") {
        test::TempDir t;
        std::mt19937_64 rng(7);
        // Holes at the start, in the middle and at the end, data at unaligned offsets.
        const std::uint64_t size = 40ull << 20;
        std::string dense(size, '\0');
        std::string path = t / "sparse";
        int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
        REQUIRE(fd >= 0);
        REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
        for (std::uint64_t off : {std::uint64_t(5 << 20) + 3, std::uint64_t(17 << 20), std::uint64_t(30 << 20) + 4095}) {
            std::string chunk(300 * 1024 + 1, '\0');
            for (auto& c : chunk) c = static_cast<char>(rng());
            REQUIRE(::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) == static_cast<ssize_t>(chunk.size()));
            dense.replace(off, chunk.size(), chunk);
        }
        ::fsync(fd);
        struct stat st {};
        REQUIRE(::fstat(fd, &st) == 0);
        REQUIRE(static_cast<std::uint64_t>(st.st_blocks) * 512 < size); // the filesystem kept the holes
        std::uint64_t n = 0;
        REQUIRE(::lseek(fd, 0, SEEK_SET) == 0);
        CHECK(hash::hash_fd(fd, path, &n) == hash::hash_bytes(dense));
        CHECK(n == size);
        CHECK(::lseek(fd, 0, SEEK_CUR) == static_cast<off_t>(size));
        // From an offset inside a hole, as hash_fd promises: the rest of the file.
        REQUIRE(::lseek(fd, 1 << 20, SEEK_SET) == 1 << 20);
        CHECK(hash::hash_fd(fd, path, &n) == hash::hash_bytes(std::string_view(dense).substr(1 << 20)));
        CHECK(n == size - (1 << 20));
        ::close(fd);
        hash::Hasher h;
        h.update_zeros(1000000);
        CHECK(h.finish() == hash::hash_bytes(std::string(1000000, '\0')));
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
