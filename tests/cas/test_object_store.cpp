#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "../support/tempdir.hpp"
#include "casmig/cas/object_store.hpp"
#include "casmig/util/aligned_buffer.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

#include <algorithm>
#include <csignal>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

std::vector<std::string> names_in(const std::string& dir) {
    casmig::util::Fd fd = casmig::util::open_dir(dir);
    auto v = casmig::util::list_dir(fd.get(), dir);
    std::sort(v.begin(), v.end());
    return v;
}

bool exists_path(const std::string& p) {
    struct stat st {};
    return ::lstat(p.c_str(), &st) == 0;
}

/// A store layout under t: objects/ with the fan-out directory of d, temp/, migration/.
void make_layout(const casmig::test::TempDir& t, const casmig::hash::Digest& d) {
    casmig::util::ensure_dir(t / "objects");
    casmig::util::ensure_dir(t / ("objects/" + d.hex().substr(0, 2)));
    casmig::util::ensure_dir(t / "temp", 0700);
    casmig::util::ensure_dir(t / "migration");
}

} // namespace

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
        // The staging directory holds only its lock once the batch is published …
        CHECK(names_in(t / ("temp/" + s.own_temp_name())) == std::vector<std::string>{"lock"});
        // dedup after publish: nothing new is written
        CHECK(s.stage_bytes(d, data) == cas::StageResult::already_present);
        CHECK(s.publish().objects == 0);
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
        std::string path = t / ("temp/" + s.own_temp_name() + "/" + tmpname);
        CHECK(test::read_file(path) == want);
        ::unlink(path.c_str());
    }
    TEST_CASE("append_sparse leaves aligned zero blocks as holes, keeps every byte, and finish() sets the size") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        cas::ObjectStore s(t / "objects", t / "temp");
        const size_t k = cas::k_sparse_block;
        util::AlignedBuffer data, zeros;
        data.reserve(4 * k);
        zeros.reserve(40 * k);
        for (size_t i = 0; i < 4 * k; ++i) data.data()[i] = static_cast<char>(i * 7 + 1);
        std::fill(zeros.data(), zeros.data() + 40 * k, '\0');
        for (auto hint : {std::uint64_t(0), std::uint64_t(64) << 20}) { // buffered, then O_DIRECT where supported
            CAPTURE(hint);
            std::string want;
            cas::TempFile f = s.create_temp(hint);
            auto add = [&](const char* p, size_t n) {
                f.append_sparse(p, n);
                want.append(p, n);
            };
            add(zeros.data(), 20 * k);     // a hole at the start
            add(data.data(), 2 * k);       // aligned data
            add(zeros.data(), k / 2);      // a short zero run: written
            add(data.data(), 100);         // unaligned from here
            add(zeros.data(), 10 * k + 5); // only its whole aligned blocks become holes
            add(data.data(), k);
            f.append_hole(3 * k); // a hole of the source
            want.append(3 * k, '\0');
            add(zeros.data(), 12 * k); // unaligned: its last partial block is written
            f.append_hole(5 * k);      // the file ends in a hole
            want.append(5 * k, '\0');
            CHECK(f.size() == want.size());
            f.finish();
            std::string tmpname = f.release();
            std::string path = t / ("temp/" + s.own_temp_name() + "/" + tmpname);
            CHECK(test::read_file(path) == want);
            struct stat st {};
            REQUIRE(::stat(path.c_str(), &st) == 0);
            CHECK(static_cast<std::uint64_t>(st.st_size) == want.size());
            // Data is about 4.5 blocks' worth; the holes (some 45 blocks) are not allocated.
            CHECK(static_cast<std::uint64_t>(st.st_blocks) * 512 <= 10 * k);
            ::unlink(path.c_str());
        }
    }
    TEST_CASE("temp/ is empty once the ObjectStore that staged there is gone, staged leftovers included") {
        test::TempDir t;
        std::string data = "never published";
        auto d = hash::hash_bytes(data);
        make_layout(t, d);
        {
            cas::ObjectStore s(t / "objects", t / "temp");
            CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
            CHECK(names_in(t / "temp").size() == 1);
        }
        CHECK(names_in(t / "temp").empty());
        CHECK_FALSE(exists_path(t / ("objects/" + cas::object_relpath(d))));
    }

    TEST_CASE("sweep_temp removes a dead process's staging directory, never a live one's") {
        test::TempDir t;
        auto d = hash::hash_bytes("x");
        make_layout(t, d);
        int ready[2];
        REQUIRE(::pipe(ready) == 0);
        pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            // The child stages a file and keeps its ObjectStore (and lock) alive until killed.
            ::close(ready[0]);
            cas::ObjectStore c(t / "objects", t / "temp");
            cas::TempFile f = c.create_temp();
            f.append("live", 4);
            std::string name = c.own_temp_name() + "/" + f.name() + "\n";
            (void)!::write(ready[1], name.data(), name.size());
            for (;;) ::pause();
        }
        ::close(ready[1]);
        std::string got;
        char buf[256];
        ssize_t n;
        while (got.find('\n') == std::string::npos && (n = ::read(ready[0], buf, sizeof buf)) > 0) got.append(buf, static_cast<size_t>(n));
        ::close(ready[0]);
        REQUIRE(got.find('\n') != std::string::npos);
        std::string live_file = t / ("temp/" + got.substr(0, got.find('\n')));
        std::string live_dir = t / ("temp/" + got.substr(0, got.find('/')));
        cas::ObjectStore s(t / "objects", t / "temp");
        auto first = s.sweep_temp();
        CHECK(first.removed == 0);
        CHECK(first.foreign.empty());
        CHECK(test::read_file(live_file) == "live"); // the owner is alive: its files stay
        ::kill(child, SIGKILL);
        int status = 0;
        ::waitpid(child, &status, 0);
        auto second = s.sweep_temp();
        CHECK(second.removed == 1);
        CHECK_FALSE(exists_path(live_dir));
        CHECK(names_in(t / "temp").empty());
    }

    TEST_CASE("sweep_temp never touches foreign entries, trash-* or rollback-*, and names the foreign ones") {
        test::TempDir t;
        auto d = hash::hash_bytes("x");
        make_layout(t, d);
        test::write_file(t / "temp/notes.txt", "the admin's");
        test::write_file(t / "temp/casmig-12-notours/file", "named almost like ours");
        test::write_file(t / "temp/casmig-12-0123456789abcdef/file", "our name, but no lock file: not ours");
        ::mkdir((t / "temp/casmig-13-0123456789abcdef").c_str(), 0700); // our name, empty: a creator died
        test::write_file(t / "temp/trash-7/tree/file", "a legacy tree cleanup moved aside");
        test::write_file(t / "temp/rollback-8/file", "a tree rollback is building");
        test::write_file(t / "temp/casmig-14-fedcba9876543210/lock", ""); // a dead process's, lock free
        test::write_file(t / "temp/casmig-14-fedcba9876543210/w0/tmp-casmig-14-1", "stale");
        test::write_file(t / "temp/tmp-casmig-99-1", "an old version's file");
        cas::ObjectStore s(t / "objects", t / "temp");
        auto r = s.sweep_temp();
        CHECK(r.removed == 2);
        CHECK(r.foreign == std::vector<std::string>{"casmig-12-0123456789abcdef", "casmig-12-notours", "notes.txt",
                                                    "tmp-casmig-99-1"});
        CHECK(names_in(t / "temp") == std::vector<std::string>{"casmig-12-0123456789abcdef", "casmig-12-notours",
                                                               "notes.txt", "rollback-8", "tmp-casmig-99-1", "trash-7"});
        CHECK(test::read_file(t / "temp/trash-7/tree/file") == "a legacy tree cleanup moved aside");
        CHECK(test::read_file(t / "temp/rollback-8/file") == "a tree rollback is building");
        CHECK(test::read_file(t / "temp/notes.txt") == "the admin's");
    }

    TEST_CASE("a symlink at temp/ is refused and its target never touched") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        test::write_file(t / "elsewhere/canary", "precious");
        REQUIRE(::symlink((t / "elsewhere").c_str(), (t / "temp").c_str()) == 0);
        CHECK_THROWS_AS(cas::ObjectStore(t / "objects", t / "temp"), util::RefusedError);
        CHECK(test::read_file(t / "elsewhere/canary") == "precious");
        ::unlink((t / "temp").c_str());
        test::write_file(t / "temp", "a file");
        CHECK_THROWS_AS(cas::ObjectStore(t / "objects", t / "temp"), util::RefusedError);
    }

    TEST_CASE("a file at an object's name that is not the object is quarantined and replaced") {
        std::string data = "the real content of the object";
        auto d = hash::hash_bytes(data);
        for (std::string planted : {std::string("planted content, same size!!!!"), std::string("short")}) {
            REQUIRE((planted.size() == data.size() || planted == "short"));
            for (bool trusting : {true, false}) {
                CAPTURE(planted);
                CAPTURE(trusting);
                test::TempDir t;
                make_layout(t, d);
                std::string obj = t / ("objects/" + cas::object_relpath(d));
                test::write_file(obj, planted, 0444);
                cas::ObjectStore s(t / "objects", t / "temp");
                if (trusting) s.trust_catalog([](const hash::Digest&) { return false; }); // the catalog does not list it
                CHECK_FALSE(s.exists(d, data.size()));
                CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
                auto st = s.publish();
                CHECK(st.objects == 1);
                REQUIRE(st.quarantined.size() == 1);
                CHECK(st.quarantined[0].digest == d);
                CHECK(st.quarantined[0].moved_to == "migration/corrupt/" + d.hex() + ".1");
                CHECK(test::read_file(obj) == data);
                CHECK(test::read_file(t / st.quarantined[0].moved_to) == planted);
                CHECK(s.exists(d));
            }
        }
    }

    TEST_CASE("a symlink at an object's name is moved aside, its target untouched") {
        test::TempDir t;
        std::string data = "content";
        auto d = hash::hash_bytes(data);
        make_layout(t, d);
        test::write_file(t / "victim", data); // even the right bytes: a symlink is never an object
        std::string obj = t / ("objects/" + cas::object_relpath(d));
        REQUIRE(::symlink((t / "victim").c_str(), obj.c_str()) == 0);
        cas::ObjectStore s(t / "objects", t / "temp");
        s.trust_catalog([](const hash::Digest&) { return false; });
        CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
        auto st = s.publish();
        REQUIRE(st.quarantined.size() == 1);
        struct stat sb {};
        REQUIRE(::lstat(obj.c_str(), &sb) == 0);
        CHECK(S_ISREG(sb.st_mode));
        CHECK(test::read_file(t / "victim") == data);
    }

    TEST_CASE("with a trusted catalog, exists() asks it per digest and forgets what it has cataloged") {
        // first: a first migration (nothing cataloged when the run began): the catalog is asked only
        // about what this run has cataloged.
        for (bool first : {false, true}) {
            CAPTURE(first);
            test::TempDir t;
            std::string data = "published, then cataloged";
            auto d = hash::hash_bytes(data);
            make_layout(t, d);
            cas::ObjectStore s(t / "objects", t / "temp");
            std::atomic<int> asked{0};
            bool listed = false;
            s.trust_catalog([&](const hash::Digest& q) {
                ++asked;
                return listed && q == d;
            }, first);
            auto other = hash::hash_bytes("never stored");
            CHECK_FALSE(s.exists(other)); // the catalog answers: no syscall, no scan of objects/
            CHECK(asked == (first ? 0 : 1)); // nothing cataloged by this run: no question at all
            CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
            s.publish();
            CHECK(s.exists(d)); // this process placed it
            listed = true;      // its row is committed
            s.forget_cataloged({d});
            asked = 0;
            CHECK(s.exists(d)); // now the catalog answers for it
            CHECK(asked == 1);
            if (first) {
                for (int i = 0; i < 1000; ++i) CHECK_FALSE(s.exists(hash::hash_bytes("new " + std::to_string(i))));
                CHECK(asked <= 2); // a filter's rare "maybe" goes to the catalog
            }
            listed = false; // a catalog that no longer lists it: nothing in memory vouches for it
            CHECK_FALSE(s.exists(d));
        }
    }

    TEST_CASE("DigestFilter: never a false no, few false maybes, from several threads") {
        hash::DigestFilter f(1 << 16); // 512k bits
        std::vector<hash::Digest> in, out;
        for (int i = 0; i < 20000; ++i) in.push_back(hash::hash_bytes("in " + std::to_string(i)));
        for (int i = 0; i < 20000; ++i) out.push_back(hash::hash_bytes("out " + std::to_string(i)));
        std::thread a([&] { for (size_t i = 0; i < in.size(); i += 2) f.add(in[i]); });
        std::thread b([&] { for (size_t i = 1; i < in.size(); i += 2) f.add(in[i]); });
        a.join();
        b.join();
        size_t missing = 0, maybes = 0;
        for (const auto& d : in) missing += !f.maybe_contains(d);
        for (const auto& d : out) maybes += f.maybe_contains(d);
        CHECK(missing == 0);
        CHECK(maybes < out.size() / 100); // 4 probes, 26 bits per digest: ~0.3%
    }

    TEST_CASE("an object found at its name with the right content is kept, read-only") {
        std::string data = "left by a killed run before its catalog commit";
        auto d = hash::hash_bytes(data);
        for (bool trusting : {true, false}) {
            CAPTURE(trusting);
            test::TempDir t;
            make_layout(t, d);
            std::string obj = t / ("objects/" + cas::object_relpath(d));
            test::write_file(obj, data, 0644);
            struct stat before {};
            REQUIRE(::stat(obj.c_str(), &before) == 0);
            cas::ObjectStore s(t / "objects", t / "temp");
            if (trusting) {
                s.trust_catalog([](const hash::Digest&) { return false; });
                CHECK(s.stage_bytes(d, data) == cas::StageResult::staged); // not listed: publish checks it
                auto st = s.publish();
                CHECK(st.objects == 0);
                CHECK(st.quarantined.empty());
            } else {
                CHECK(s.stage_bytes(d, data) == cas::StageResult::already_present); // checked by content
            }
            struct stat after {};
            REQUIRE(::stat(obj.c_str(), &after) == 0);
            CHECK(before.st_ino == after.st_ino);
            CHECK((after.st_mode & 07777) == 0444);
            CHECK(!exists_path(t / "migration/corrupt"));
        }
    }

    TEST_CASE("after a failed publish, objects it did not place are not known") {
        test::TempDir t;
        std::string data = "will not be placed";
        auto d = hash::hash_bytes(data);
        make_layout(t, d);
        // The fan-out directory is a file: the rename fails (ENOTDIR) without any fault seam.
        std::string fan = t / ("objects/" + d.hex().substr(0, 2));
        ::rmdir(fan.c_str());
        test::write_file(fan, "not a directory");
        cas::ObjectStore s(t / "objects", t / "temp");
        s.trust_catalog([](const hash::Digest&) { return false; });
        CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
        CHECK_THROWS_AS(s.publish(), util::SystemError);
        CHECK_FALSE(s.exists(d));
        CHECK(s.staged_count() == 0);
        // The staged file went with the failure: nothing of it is left in temp/.
        std::string own = t / ("temp/" + s.own_temp_name());
        for (const auto& n : names_in(own))
            if (n != "lock") CHECK(names_in(own + "/" + n).empty());
        // Once the cause is gone, a new stage and publish place it.
        ::unlink(fan.c_str());
        ::mkdir(fan.c_str(), 0755);
        CHECK(s.stage_bytes(d, data) == cas::StageResult::staged);
        CHECK(s.publish().objects == 1);
        CHECK(test::read_file(t / ("objects/" + cas::object_relpath(d))) == data);
    }

    TEST_CASE("TempFile move assignment over a live temp file removes the old file and keeps the new one") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        cas::ObjectStore s(t / "objects", t / "temp");
        auto exists = [&](const std::string& name) {
            struct stat sb {};
            return ::lstat((t / ("temp/" + s.own_temp_name() + "/" + name)).c_str(), &sb) == 0;
        };
        cas::TempFile a = s.create_temp();
        a.append("old", 3);
        cas::TempFile b = s.create_temp();
        b.append("new content", 11);
        const std::string old_name = a.name(), new_name = b.name();
        REQUIRE(old_name.size() > 15); // long enough to live on the heap: a freed name is a real use-after-free
        REQUIRE(exists(old_name));
        a = std::move(b);
        CHECK_FALSE(exists(old_name));
        CHECK(exists(new_name));
        CHECK(a.name() == new_name);
        CHECK(b.name().empty());
        a.append(" more", 5); // the moved-in fd is still open and ours
        const std::string kept = a.release();
        CHECK(kept == new_name);
        CHECK(test::read_file(t / ("temp/" + s.own_temp_name() + "/" + kept)) == "new content more");
        // Assigning an empty TempFile over a live one drops the live file too.
        cas::TempFile c = s.create_temp();
        const std::string c_name = c.name();
        c = cas::TempFile();
        CHECK_FALSE(exists(c_name));
        CHECK(c.name().empty());
        ::unlink((t / ("temp/" + s.own_temp_name() + "/" + kept)).c_str());
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
        CHECK(s.discard_staged([&](const hash::Digest& d) { return d == ds[0]; }) == 2);
        CHECK(s.staged_count() == 1);
        CHECK_FALSE(s.exists(ds[1]));
        CHECK(s.publish().objects == 1);
        CHECK(s.on_disk(ds[0]));
        CHECK_FALSE(s.on_disk(ds[1]));
        CHECK_FALSE(s.on_disk(ds[2]));
        // Nothing kept: everything staged goes.
        auto d = hash::hash_bytes("again");
        ::mkdir((t / "objects/" + d.hex().substr(0, 2)).c_str(), 0755);
        REQUIRE(s.stage_bytes(d, "again") == cas::StageResult::staged);
        CHECK(s.discard_staged(nullptr) == 1);
        CHECK(s.staged_count() == 0);
        CHECK(s.publish().objects == 0);
        CHECK_FALSE(s.on_disk(d));
    }
}
