#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/cas/object_store.hpp"
#include "casmig/util/aligned_buffer.hpp"
#include "casmig/util/fd.hpp"

#include <sys/stat.h>
#include <unistd.h>

using namespace casmig;

TEST_SUITE("cas::ObjectStore") {
    TEST_CASE("object_relpath fans out on the first byte") {
        auto d = hash::hash_bytes("");
        CHECK(cas::object_relpath(d) == "af/1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }
    TEST_CASE("a staged object appears read-only under its name only after publish") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "objects/ba");
        util::ensure_dir(t / "temp");
        cas::ObjectStore s(t / "objects", t / "temp");
        std::string data = "hello objects";
        auto d = hash::hash_bytes(data);
        ::mkdir((t / "objects/" + d.hex().substr(0, 2)).c_str(), 0755);
        CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
        CHECK(s.exists(d));
        CHECK_FALSE(s.on_disk(d));
        CHECK(s.stage_bytes(d, data) == cas::StageResult::already_present); // dedup before publish
        auto st = s.publish();
        CHECK(st.objects == 1);
        CHECK(s.on_disk(d));
        std::string path = t / ("objects/" + cas::object_relpath(d));
        CHECK(test::read_file(path) == data);
        struct stat sb {};
        REQUIRE(::stat(path.c_str(), &sb) == 0);
        CHECK((sb.st_mode & 0222) == 0);
        util::Fd tmp = util::open_dir(t / "temp");
        CHECK(util::list_dir(tmp.get(), "temp").empty());
        // dedup after publish: nothing new is written
        CHECK(s.stage_bytes(d, data) == cas::StageResult::already_present);
        CHECK(s.publish().objects == 0);
        CHECK(util::list_dir(tmp.get(), "temp").empty());
    }
    TEST_CASE("an existing object is never replaced, even by a racing publish") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        std::string data = "content";
        auto d = hash::hash_bytes(data);
        ::mkdir((t / "objects/" + d.hex().substr(0, 2)).c_str(), 0755);
        cas::ObjectStore a(t / "objects", t / "temp");
        cas::ObjectStore b(t / "objects", t / "temp");
        CHECK(a.stage_bytes(d, data) == cas::StageResult::staged);
        CHECK(b.stage_bytes(d, data) == cas::StageResult::staged); // b cannot see a's staging
        struct stat first {};
        a.publish();
        REQUIRE(::stat((t / ("objects/" + cas::object_relpath(d))).c_str(), &first) == 0);
        CHECK(b.publish().objects == 0); // EEXIST: b's copy is dropped
        struct stat second {};
        REQUIRE(::stat((t / ("objects/" + cas::object_relpath(d))).c_str(), &second) == 0);
        CHECK(first.st_ino == second.st_ino);
        util::Fd tmp = util::open_dir(t / "temp");
        CHECK(util::list_dir(tmp.get(), "temp").empty());
    }
    TEST_CASE("remove_stale_temp clears what a killed run left") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        test::write_file(t / "temp/tmp-casmig-123-1", "half an object");
        test::write_file(t / "temp/rollback-7/deep/file", "half a tree");
        cas::ObjectStore s(t / "objects", t / "temp");
        s.remove_stale_temp();
        util::Fd tmp = util::open_dir(t / "temp");
        CHECK(util::list_dir(tmp.get(), "temp").empty());
    }
    TEST_CASE("a large temp file gets every byte whatever the alignment of the appends") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        cas::ObjectStore s(t / "objects", t / "temp");
        util::AlignedBuffer buf;
        buf.reserve(1 << 20);
        for (size_t i = 0; i < (1 << 20); ++i) buf.data()[i] = static_cast<char>(i * 131 + (i >> 12));
        std::string want;
        cas::TempFile f = s.create_temp(1 << 20);
        auto add = [&](const char* p, size_t n) {
            f.append(p, n);
            want.append(p, n);
        };
        add(buf.data(), 256 << 10);         // aligned start and length: straight to disk where supported
        add(buf.data() + 4096, 8192);       // aligned again
        add(buf.data() + 1, 5000);          // unaligned pointer: from here on buffered
        add(buf.data(), 64 << 10);          // aligned, but the file has gone buffered: still appended
        CHECK_FALSE(f.direct());
        std::string tmpname = f.release();
        CHECK(test::read_file(t / ("temp/" + tmpname)) == want);
        ::unlink((t / ("temp/" + tmpname)).c_str());
    }
    TEST_CASE("discard_staged deletes the staged files not kept, and publish places only the kept ones") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        cas::ObjectStore s(t / "objects", t / "temp");
        std::vector<hash::Digest> ds;
        for (std::string data : {"kept", "dropped one", "dropped two"}) {
            auto d = hash::hash_bytes(data);
            ::mkdir((t / "objects/" + d.hex().substr(0, 2)).c_str(), 0755);
            REQUIRE(s.stage_bytes(d, data) == cas::StageResult::staged);
            ds.push_back(d);
        }
        // A temp file of this process that nothing staged (left by a failed publish) goes too.
        cas::TempFile stray = s.create_temp();
        std::string stray_name = stray.release();
        CHECK(s.discard_staged([&](const hash::Digest& d) { return d == ds[0]; }) == 3);
        CHECK(s.staged_count() == 1);
        CHECK_FALSE(s.exists(ds[1]));
        CHECK(::access((t / ("temp/" + stray_name)).c_str(), F_OK) != 0);
        CHECK(s.publish().objects == 1);
        CHECK(s.on_disk(ds[0]));
        CHECK_FALSE(s.on_disk(ds[1]));
        CHECK_FALSE(s.on_disk(ds[2]));
        util::Fd tmp = util::open_dir(t / "temp");
        CHECK(util::list_dir(tmp.get(), "temp").empty());
        // Nothing kept: everything staged goes, temp/ is empty.
        auto d = hash::hash_bytes("again");
        ::mkdir((t / "objects/" + d.hex().substr(0, 2)).c_str(), 0755);
        REQUIRE(s.stage_bytes(d, "again") == cas::StageResult::staged);
        CHECK(s.discard_staged(nullptr) == 1);
        CHECK(s.staged_count() == 0);
        CHECK(util::list_dir(tmp.get(), "temp").empty());
    }
}
