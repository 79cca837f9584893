#include <doctest/doctest.h>

#include "../support/fixture.hpp"
#include "casmig/migrate/pipeline.hpp"
#include "casmig/util/interrupt.hpp"

#include <csignal>
#include <sys/stat.h>

using namespace casmig;
using catalog::PackageState;

TEST_SUITE("migrate::Pipeline") {
    TEST_CASE("migrate dedups shared files and verifies every package") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        auto lock = s.lock("test");
        std::vector<Problem> problems;
        auto r = migrate::migrate(s, {}, nullptr, [&](const Problem& p) { problems.push_back(p); });
        CHECK(problems.empty());
        CHECK(r.migrated == 3);
        CHECK(r.verified == 3);
        CHECK(r.files == 9);
        // LICENSE (shared), the empty file (shared), three distinct tools
        CHECK(r.new_objects == 5);
        for (auto& p : s.catalog().packages()) CHECK(p.state == PackageState::verified);
        CHECK(s.catalog().mode() == catalog::StoreMode::dual);
        // nothing to do the second time
        auto again = migrate::migrate(s, {}, nullptr, nullptr);
        CHECK(again.packages == 0);
        CHECK(again.new_objects == 0);
    }
    TEST_CASE("one bad package fails alone; retry after the fix succeeds") {
        test::TempDir t;
        test::make_small_store(t.path());
        test::write_file(t / "bad/ok", "fine");
        ::mkfifo((t / "bad/pipe").c_str(), 0644);
        store::Store s(t.path());
        auto lock = s.lock("test");
        std::vector<Problem> problems;
        auto r = migrate::migrate(s, {}, nullptr, [&](const Problem& p) { problems.push_back(p); });
        CHECK(r.failed == 1);
        CHECK(r.verified == 3);
        REQUIRE(problems.size() == 1);
        CHECK(problems[0].package == "bad");
        CHECK(problems[0].path == "pipe");
        auto bad = s.catalog().package("bad");
        REQUIRE(bad);
        CHECK(bad->state == PackageState::failed);
        CHECK_FALSE(bad->has_manifest);
        CHECK(bad->error.find("pipe") != std::string::npos);
        // Without --retry-failed nothing is retried.
        CHECK(migrate::migrate(s, {}, nullptr, nullptr).packages == 0);
        ::unlink((t / "bad/pipe").c_str());
        migrate::Options o;
        o.retry_failed = migrate::RetryFailed::yes;
        auto r2 = migrate::migrate(s, o, nullptr, nullptr);
        CHECK(r2.verified == 1);
        CHECK(s.catalog().package("bad")->state == PackageState::verified);
    }
    TEST_CASE("a stop request starts no package: all left pending, then a run without it migrates all") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        auto lock = s.lock("test");
        util::request_stop(SIGTERM);
        migrate::Result r;
        try {
            r = migrate::migrate(s, {}, nullptr, nullptr);
        } catch (...) {
            util::clear_stop();
            throw;
        }
        util::clear_stop();
        CHECK(r.interrupted);
        CHECK(r.migrated == 0);
        CHECK(r.left == 3);
        CHECK(r.left_unverified == 0);
        CHECK_FALSE(r.stopped_by_budget);
        for (auto& p : s.catalog().packages()) CHECK(p.state == PackageState::pending);
        auto again = migrate::migrate(s, {}, nullptr, nullptr);
        CHECK_FALSE(again.interrupted);
        CHECK(again.verified == 3);
    }
    TEST_CASE("--limit, named packages and a zero time budget bound a run") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        auto lock = s.lock("test");
        migrate::Options named;
        named.packages = {"pkg2"};
        CHECK(migrate::migrate(s, named, nullptr, nullptr).migrated == 1);
        CHECK(s.catalog().package("pkg2")->state == PackageState::verified);
        CHECK(s.catalog().package("pkg0")->state == PackageState::pending);
        migrate::Options zero;
        zero.time_budget = std::chrono::milliseconds(0);
        auto z = migrate::migrate(s, zero, nullptr, nullptr);
        CHECK(z.migrated == 0);
        CHECK(z.stopped_by_budget);
        migrate::Options one;
        one.limit = 1;
        CHECK(migrate::migrate(s, one, nullptr, nullptr).migrated == 1);
        migrate::Options unknown;
        unknown.packages = {"no-such-package"};
        CHECK_THROWS_AS(migrate::migrate(s, unknown, nullptr, nullptr), util::UsageError);
    }
    TEST_CASE("plan counts exactly and writes nothing") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        auto r = migrate::plan(s, {}, nullptr, nullptr);
        CHECK(r.packages == 3);
        CHECK(r.files == 9);
        CHECK(r.unique_objects == 5);
        std::uint64_t unique = 20 /*LICENSE*/ + 0 /*empty*/;
        for (int i = 0; i < 3; ++i) unique += std::string("#!/bin/sh\necho tool 0\n").size();
        CHECK(r.unique_bytes == unique);
        CHECK(r.needed_bytes >= r.unique_bytes);
        struct stat st {};
        CHECK(::stat((t / "objects").c_str(), &st) != 0);
        CHECK(::stat((t / "store.db").c_str(), &st) != 0);
        // after a migrate, a new package named on the command line is planned before discovery,
        // and content already in the CAS costs nothing
        {
            auto lock = s.lock("test");
            migrate::migrate(s, {}, nullptr, nullptr);
        }
        test::write_file(t / "late/LICENSE", "shared license text\n");
        migrate::Options named;
        named.packages = {"late"};
        auto late = migrate::plan(s, named, nullptr, nullptr);
        CHECK(late.packages == 1);
        CHECK(late.files == 1);
        CHECK(late.unique_bytes == 0);
    }
    TEST_CASE("a package killed in progress is migrated by the next run") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        auto lock = s.lock("test");
        s.discover();
        auto p = s.catalog().package("pkg1");
        s.catalog().set_state(p->id, PackageState::in_progress); // as a kill -9 leaves it
        // What a killed run leaves: its staging directory, whose lock died with it.
        test::write_file(t / "temp/casmig-999-0123456789abcdef/lock", "");
        test::write_file(t / "temp/casmig-999-0123456789abcdef/w0/tmp-casmig-999-1", "stale");
        {
            store::Store s2(t.path());
            auto r = migrate::migrate(s2, {}, nullptr, nullptr);
            CHECK(r.verified == 3);
        }
        util::Fd tmp = util::open_dir(t / "temp");
        CHECK(util::list_dir(tmp.get(), "temp").size() == 1); // stale files go at the next lock()
        store::Store s3(t.path());
        auto l3 = std::move(lock);
        l3.reset();
        auto relock = s3.lock("test");
        CHECK(util::list_dir(tmp.get(), "temp").empty());
    }
}
