#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/cas/compression.hpp"
#include "casmig/cas/object_store.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

#include <fcntl.h>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

using namespace casmig;

namespace {

std::string words(size_t n, unsigned seed) {
    static const char* w[] = {"module", "exports", "require", "function", "return", "const", "value", "index", "default",
                              "object", "string", "length", "import", "promise", "error", "version", "license"};
    std::mt19937 rng(seed);
    std::string s;
    while (s.size() < n) s += std::string(w[rng() % 17]) + (rng() % 7 ? " " : "\n");
    s.resize(n);
    return s;
}

std::string random_bytes(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
}

/// A reader over a file holding `bytes` (written to t/name).
cas::ObjectReader reader_of(const test::TempDir& t, const std::string& name, const std::string& bytes, cas::Form form,
                            const cas::Dictionaries* dicts = nullptr) {
    test::write_file(t / name, bytes);
    int fd = ::open((t / name).c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    return cas::ObjectReader(util::Fd(fd), form, t / name, dicts);
}

std::string read_all(cas::ObjectReader& r) {
    std::string out;
    char buf[1000];
    for (;;) {
        size_t n = r.read(buf, sizeof buf);
        if (n == 0) return out;
        out.append(buf, n);
    }
}

void make_layout(const test::TempDir& t) {
    util::ensure_dir(t / "objects");
    for (int i = 0; i < 256; ++i) {
        char b[3];
        std::snprintf(b, sizeof b, "%02x", i);
        util::ensure_dir(t / (std::string("objects/") + b));
    }
    util::ensure_dir(t / "temp", 0700);
    util::ensure_dir(t / "migration");
    util::ensure_dir(t / "packages");
}

} // namespace

TEST_SUITE("cas::Compression") {
    TEST_CASE("the setting round-trips and a damaged one is refused") {
        cas::Compression c;
        CHECK(c.setting() == "zstd:6");
        c.level = 19;
        c.dict = hash::hash_bytes("d");
        auto back = cas::Compression::parse(c.setting());
        CHECK(back.level == 19);
        CHECK(back.dict == c.dict);
        for (const char* bad : {"", "zstd", "zstd:", "zstd:0", "zstd:23", "zstd:3:", "zstd:3:dict=ab", "gzip:3", "zstd:3x"})
            CHECK_THROWS_AS(cas::Compression::parse(bad), util::Error);
    }
    TEST_CASE("worth_compressing keeps a frame only when it saves an eighth and 32 bytes") {
        CHECK_FALSE(cas::worth_compressing(63, 1));      // below k_compress_min
        CHECK(cas::worth_compressing(64, 32));           // saves 32 = half
        CHECK_FALSE(cas::worth_compressing(64, 33));     // saves 31 bytes
        CHECK(cas::worth_compressing(8000, 7000));       // saves exactly an eighth
        CHECK_FALSE(cas::worth_compressing(8000, 7001)); // a little less
        CHECK_FALSE(cas::worth_compressing(1000, 1000));
        CHECK_FALSE(cas::worth_compressing(1000, 1200));
    }
}

TEST_SUITE("cas::ObjectReader") {
    TEST_CASE("a frame decompresses to the original bytes, with and without a dictionary") {
        test::TempDir t;
        std::vector<std::string> samples;
        for (unsigned i = 0; i < 400; ++i) samples.push_back(words(200 + i * 7 % 3000, i));
        std::string dict = cas::train_dictionary(samples, cas::k_default_level, 16 * 1024);
        REQUIRE_FALSE(dict.empty());
        util::ensure_dir(t / "packages");
        util::ensure_dir(t / "packages/dict");
        test::write_file(t / ("packages/dict/" + hash::hash_bytes(dict).hex()), dict);
        cas::Dictionaries dicts(t / "packages/dict");
        CHECK(dicts.load(hash::hash_bytes(dict)) == dict);
        std::string data = words(1500, 999);
        for (bool use_dict : {false, true}) {
            CAPTURE(use_dict);
            cas::Compressor c(3, use_dict ? std::string_view(dict) : std::string_view());
            std::string frame;
            c.compress(data.data(), data.size(), frame);
            CHECK(frame.size() < data.size() / 2);
            auto r = reader_of(t, use_dict ? "with" : "without", frame, cas::Form::zstd, &dicts);
            CHECK(r.content_size() == data.size());
            CHECK(read_all(r) == data);
        }
        SUBCASE("the dictionary is found by the frame's ID; without it the object is corrupt") {
            cas::Compressor c(3, dict);
            std::string frame;
            c.compress(data.data(), data.size(), frame);
            cas::Dictionaries none(t / "nowhere");
            auto r = reader_of(t, "nodict", frame, cas::Form::zstd, &none);
            CHECK_THROWS_AS(read_all(r), cas::CorruptObject);
        }
    }
    TEST_CASE("damaged frames are corrupt objects, never wrong bytes returned as right") {
        test::TempDir t;
        std::string data = words(50000, 1);
        cas::Compressor c(3, {});
        std::string frame;
        c.compress(data.data(), data.size(), frame);
        // read_all() reads in small pieces (the streaming path), hash_content() into 1 MiB (one call).
        SUBCASE("bytes after the frame") {
            auto r = reader_of(t, "trailing", frame + "x", cas::Form::zstd);
            CHECK_THROWS_AS(read_all(r), cas::CorruptObject);
            auto r2 = reader_of(t, "trailing2", frame + "x", cas::Form::zstd);
            CHECK_THROWS_AS(cas::hash_content(r2), cas::CorruptObject);
        }
        SUBCASE("truncated") {
            auto r = reader_of(t, "short", frame.substr(0, frame.size() - 3), cas::Form::zstd);
            CHECK_THROWS_AS(read_all(r), cas::CorruptObject);
            auto r2 = reader_of(t, "short2", frame.substr(0, frame.size() - 3), cas::Form::zstd);
            CHECK_THROWS_AS(cas::hash_content(r2), cas::CorruptObject);
        }
        SUBCASE("both paths give the original bytes") {
            auto r = reader_of(t, "good", frame, cas::Form::zstd);
            CHECK(cas::hash_content(r) == hash::hash_bytes(data));
        }
        SUBCASE("not a frame at all") {
            auto r = reader_of(t, "plain", data, cas::Form::zstd);
            CHECK_THROWS_AS(r.content_size(), cas::CorruptObject);
        }
        SUBCASE("a flipped byte in a block: an error or other bytes, which the hash catches") {
            std::string bad = frame;
            bad[bad.size() / 2] ^= 0x40;
            auto r = reader_of(t, "flipped", bad, cas::Form::zstd);
            bool caught = false;
            std::string got;
            try {
                got = read_all(r);
            } catch (const cas::CorruptObject&) {
                caught = true;
            }
            CHECK((caught || hash::hash_bytes(got) != hash::hash_bytes(data)));
        }
    }
    TEST_CASE("a raw object reads as itself") {
        test::TempDir t;
        std::string data = random_bytes(300000, 5);
        auto r = reader_of(t, "raw", data, cas::Form::raw);
        CHECK(r.content_size() == data.size());
        std::uint64_t n = 0;
        CHECK(cas::hash_content(r, &n) == hash::hash_bytes(data));
        CHECK(n == data.size());
    }
    TEST_CASE("the streaming compressor makes one frame with its content size") {
        test::TempDir t;
        std::string data = words(3 << 20, 7);
        cas::Compressor c(3, {});
        cas::Compressor::Stream z(c, data.size());
        std::string frame;
        auto sink = [&](const char* p, size_t n) { frame.append(p, n); };
        for (size_t i = 0; i < data.size(); i += 100000) z.feed(data.data() + i, std::min<size_t>(100000, data.size() - i), sink);
        z.finish(sink);
        auto r = reader_of(t, "stream", frame, cas::Form::zstd);
        CHECK(r.content_size() == data.size());
        CHECK(read_all(r) == data);
    }
}

TEST_SUITE("cas::ObjectStore") {
    TEST_CASE("with a compressor, stage_bytes stores .zst only when worth it, and open_content reads either") {
        test::TempDir t;
        make_layout(t);
        cas::ObjectStore s(t / "objects", t / "temp");
        s.set_compressor(std::make_shared<cas::Compressor>(3, std::string_view()));
        std::string text = words(10000, 3), noise = random_bytes(10000, 4), tiny = "tiny";
        auto dt = hash::hash_bytes(text), dn = hash::hash_bytes(noise), dy = hash::hash_bytes(tiny);
        CHECK(s.stage_bytes(dt, text) == cas::StageResult::staged);
        CHECK(s.stage_bytes(dn, noise) == cas::StageResult::staged);
        CHECK(s.stage_bytes(dy, tiny) == cas::StageResult::staged);
        s.publish();
        CHECK(s.form_on_disk(dt) == cas::Form::zstd);
        CHECK(s.form_on_disk(dn) == cas::Form::raw);
        CHECK(s.form_on_disk(dy) == cas::Form::raw);
        struct stat st {};
        REQUIRE(::lstat((t / ("objects/" + cas::object_relpath(dt, cas::Form::zstd))).c_str(), &st) == 0);
        CHECK((st.st_mode & 07777) == 0444);
        CHECK(s.stored_size(dt) == static_cast<std::uint64_t>(st.st_size));
        CHECK(s.stored_size(dn) == noise.size());
        std::uint64_t size = 0;
        CHECK(s.on_disk(dt, &size));
        CHECK(size == text.size());
        // has_stored: the form and bytes the catalog records, one lstat; anything else is no verdict.
        const auto zst_size = static_cast<std::uint64_t>(st.st_size);
        CHECK(s.has_stored(dt, text.size(), zst_size));
        CHECK(s.has_stored(dn, noise.size(), noise.size()));
        CHECK_FALSE(s.has_stored(dt, text.size(), text.size()));     // the catalog says raw: not there
        CHECK_FALSE(s.has_stored(dt, text.size(), zst_size - 1));    // shorter than it was written
        CHECK_FALSE(s.has_stored(dn, noise.size(), noise.size() - 1)); // a raw object is never smaller than its content
        CHECK_FALSE(s.has_stored(hash::hash_bytes("absent"), 6, 6));
        for (auto [d, data] : {std::pair{dt, text}, std::pair{dn, noise}}) {
            auto r = s.open_content(d);
            CHECK(read_all(r) == data);
        }
        SUBCASE("a torn .zst object fails has_stored") {
            std::string zpath = t / ("objects/" + cas::object_relpath(dt, cas::Form::zstd));
            ::chmod(zpath.c_str(), 0644);
            REQUIRE(::truncate(zpath.c_str(), static_cast<off_t>(zst_size - 3)) == 0);
            CHECK_FALSE(s.has_stored(dt, text.size(), zst_size));
        }
        SUBCASE("a fresh store (no catalog trust) finds the .zst object by its content") {
            cas::ObjectStore again(t / "objects", t / "temp");
            CHECK(again.exists(dt, text.size()));
            CHECK_FALSE(again.exists(hash::hash_bytes("absent")));
        }
        SUBCASE("a damaged .zst object is not taken as present; publish puts the object back") {
            std::string zpath = t / ("objects/" + cas::object_relpath(dt, cas::Form::zstd));
            ::chmod(zpath.c_str(), 0644);
            test::write_file(zpath, "garbage that is no frame");
            cas::ObjectStore again(t / "objects", t / "temp");
            again.set_compressor(std::make_shared<cas::Compressor>(3, std::string_view()));
            CHECK_FALSE(again.exists(dt, text.size()));
            CHECK(again.stage_bytes(dt, text) == cas::StageResult::staged);
            auto ps = again.publish();
            CHECK(ps.quarantined.size() == 1);
            auto r = again.open_content(dt);
            CHECK(read_all(r) == text);
        }
    }
    TEST_CASE("store_dictionary writes packages/dict/<BLAKE3> and a rerun keeps it") {
        test::TempDir t;
        make_layout(t);
        cas::ObjectStore s(t / "objects", t / "temp");
        std::string dict = "not really a dictionary, but bytes";
        auto d = s.store_dictionary(dict);
        CHECK(d == hash::hash_bytes(dict));
        CHECK(s.dictionaries().load(d) == dict);
        CHECK(s.store_dictionary(dict) == d);
        SUBCASE("a damaged file at the name is moved aside, never deleted") {
            std::string p = t / ("packages/dict/" + d.hex());
            ::chmod(p.c_str(), 0644);
            test::write_file(p, "damaged");
            CHECK(s.store_dictionary(dict) == d);
            CHECK(s.dictionaries().load(d) == dict);
            util::Fd q = util::open_dir(t / "migration/corrupt");
            CHECK(util::list_dir(q.get(), "q").size() == 1);
        }
    }
}
