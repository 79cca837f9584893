#include <doctest/doctest.h>

#include "casmig/manifest/manifest.hpp"

#include <string>

using namespace casmig;
using namespace casmig::manifest;

namespace {

Entry dir(std::string p, std::uint32_t mode = 0755) {
    Entry e;
    e.path = std::move(p);
    e.type = EntryType::dir;
    e.mode = mode;
    e.mtime_ns = 1700000000123456789;
    return e;
}
Entry file(std::string p, std::string content, std::optional<std::string> link = {}) {
    Entry e;
    e.path = std::move(p);
    e.type = EntryType::file;
    e.mode = 0644;
    e.size = content.size();
    e.digest = hash::hash_bytes(content);
    e.mtime_ns = -5; // before 1970: signed
    e.uid = 1000;
    e.gid = 4294967295u;
    e.link_to = std::move(link);
    return e;
}
Entry sym(std::string p, std::string target) {
    Entry e;
    e.path = std::move(p);
    e.type = EntryType::symlink;
    e.mode = 0777;
    e.target = std::move(target);
    e.size = e.target.size();
    return e;
}
std::string xattr(std::string name, std::string value) {
    std::string out;
    auto u32 = [&](std::uint32_t v) {
        for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    };
    u32(static_cast<std::uint32_t>(name.size()));
    out += name;
    u32(static_cast<std::uint32_t>(value.size()));
    out += value;
    return out;
}

std::vector<Entry> sample() {
    std::vector<Entry> m = {dir(""), dir("a"), file("a/b", "x"), file("a-c", "x", "a/b"),
                            sym("link", "a/b"), file(std::string("odd\n\xff name", 10), ""), dir("z", 01777)};
    m.back().xattrs = xattr("user.k", "v");
    m[2].xlink = 0x7fffffffffffffffLL; // a link group across packages
    m[3].xlink = 0x7fffffffffffffffLL;
    return m;
}

void same(const std::vector<Entry>& a, const std::vector<Entry>& b) {
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
        CAPTURE(a[i].path);
        CHECK(a[i].path == b[i].path);
        CHECK(a[i].type == b[i].type);
        CHECK(a[i].mode == b[i].mode);
        CHECK(a[i].size == b[i].size);
        CHECK(a[i].digest == b[i].digest);
        CHECK(a[i].target == b[i].target);
        CHECK(a[i].mtime_ns == b[i].mtime_ns);
        CHECK(a[i].uid == b[i].uid);
        CHECK(a[i].gid == b[i].gid);
        CHECK(a[i].link_to == b[i].link_to);
        CHECK(a[i].xattrs == b[i].xattrs);
        CHECK(a[i].xlink == b[i].xlink);
    }
}

} // namespace

TEST_SUITE("manifest") {
    TEST_CASE("normalize sorts by path bytes and makes the first path of a link group its leader") {
        auto m = sample(); // walk order: "a-c" names "a/b", walked first; in byte order '-' < '/'
        normalize(m);
        REQUIRE(m.size() == 7);
        CHECK(m[1].path == "a");
        CHECK(m[2].path == "a-c");
        CHECK(!m[2].link_to);
        CHECK(m[3].path == "a/b");
        CHECK(m[3].link_to == std::optional<std::string>("a-c"));
    }

    TEST_CASE("encode then decode gives the same manifest, and the encoding is canonical") {
        auto m = sample();
        normalize(m);
        std::string enc = encode(m);
        same(decode(enc), m);
        auto again = sample();
        std::swap(again[4], again[5]); // another walk order, the same tree
        normalize(again);
        CHECK(encode(again) == enc);
        CHECK(digest_of(encode(again)) == digest_of(enc));
        auto changed = m;
        changed[2].mtime_ns += 1;
        CHECK(digest_of(encode(changed)) != digest_of(enc));
    }

    TEST_CASE("decode refuses every truncation and every single-byte change it can tell") {
        auto m = sample();
        normalize(m);
        std::string enc = encode(m);
        for (size_t n = 0; n < enc.size(); ++n) CHECK_THROWS_AS(decode(enc.substr(0, n)), FormatError);
        CHECK_THROWS_AS(decode(enc + std::string(1, '\0')), FormatError);
        // Flipping bytes must never crash; each result either throws FormatError or is a valid manifest.
        for (size_t i = 0; i < enc.size(); ++i)
            for (int bit = 0; bit < 8; ++bit) {
                std::string d = enc;
                d[i] = static_cast<char>(d[i] ^ (1 << bit));
                try {
                    auto out = decode(d);
                    CHECK(encode(out) == d); // whatever decodes is canonical
                } catch (const FormatError&) {
                }
            }
    }

    TEST_CASE("decode refuses manifests that would let a reader escape or misbuild the tree") {
        auto enc_of = [](const std::vector<Entry>& m) { return encode(m); };
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), file("..", "x")})), doctest::Contains("invalid path"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), dir("a"), file("a/../b", "x")})), doctest::Contains("invalid path"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), file("a//b", "x")})), doctest::Contains("invalid path"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), file("a/b", "x")})), doctest::Contains("parent"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), file("a", "x"), file("a/b", "x")})), doctest::Contains("parent"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({file("", "x")})), doctest::Contains("root"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), file("b", "x", "a")})), doctest::Contains("hard link"), FormatError);
        CHECK_THROWS_WITH_AS(decode(enc_of({dir(""), sym("s", "")})), doctest::Contains("symlink target"), FormatError);
        auto bad_x = dir("");
        bad_x.xattrs = "\x05";
        CHECK_THROWS_WITH_AS(decode(enc_of({bad_x})), doctest::Contains("extended attributes"), FormatError);
        CHECK_THROWS_AS(encode({dir(""), file("b", "x"), file("a", "x")}), FormatError); // not normalized
        CHECK_THROWS_WITH_AS(decode("casmig manifest\n\x02"), doctest::Contains("version 2"), FormatError);
        CHECK_THROWS_WITH_AS(decode("not a manifest at all"), doctest::Contains("not a casmig manifest"), FormatError);
        // A huge entry count in a tiny manifest is damage, not an allocation.
        CHECK_THROWS_WITH_AS(decode(std::string("casmig manifest\n\x01\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 26)),
                             doctest::Contains("entry count"), FormatError);
    }
}
