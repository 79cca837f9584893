#include <doctest/doctest.h>

#include "../support/fixture.hpp"
#include "casmig/store/store.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"

#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <sys/file.h>
#include <sys/wait.h>
#include <thread>
#include <vector>

using namespace casmig;
using store::Purpose;

namespace {

std::string marker_text(const test::TempDir& t) { return test::read_file(t / "migration/identity"); }

catalog::Identity catalog_identity(const std::string& db) {
    catalog::Catalog c(db, catalog::OpenMode::read_only);
    auto id = c.identity();
    REQUIRE(id);
    return *id;
}

} // namespace

TEST_SUITE("store::Store") {
    TEST_CASE("is_package_name refuses paths and reserved names") {
        CHECK(store::is_package_name("pkg0"));
        for (const char* bad : {"", ".", "..", "../victim", "a/b", ".hidden", "objects", "temp", "migration", "packages"})
            CHECK_FALSE(store::is_package_name(bad));
    }
    TEST_CASE("the first locked run claims a new store; a read writes nothing") {
        test::TempDir t;
        test::make_small_store(t.path());
        store::Store s(t.path());
        s.check_catalog(Purpose::read, "status");
        CHECK(test::read_file(t / "store.db") == "<missing>");
        CHECK_FALSE(s.read_marker());
        auto lock = s.lock("test");
        auto m = s.read_marker();
        REQUIRE(m);
        CHECK(m->store_id.size() == 32);
        CHECK(m->generation == 0);
        CHECK(marker_text(t) == "casmig-store-identity 1\nstore_id " + m->store_id + "\ngeneration 0\n");
        CHECK(s.catalog().identity()->store_id == m->store_id);
    }
    TEST_CASE("destroy advances the generation; a catalog copied before it is refused") {
        test::TempDir t;
        test::make_small_store(t.path());
        {
            store::Store s(t.path());
            auto lock = s.lock("test");
            s.discover();
        }
        std::filesystem::copy_file(t / "store.db", t / "backup.db");
        {
            store::Store s(t.path());
            auto lock = s.lock("test", Purpose::destroy);
            CHECK(s.read_marker()->generation == 1);
            CHECK(s.catalog().identity()->generation == 1);
        }
        {
            store::Store s(t.path());
            auto lock = s.lock("test", Purpose::dry_run); // checks, advances nothing
            CHECK(s.read_marker()->generation == 1);
        }
        test::write_file(t / "objects/ab/" + std::string(62, 'c'), "x"); // the store holds objects now
        store::Store old(t.path(), t / "backup.db");
        CHECK_THROWS_AS(old.check_catalog(Purpose::read, "status"), util::RefusedError);
        CHECK_THROWS_AS(old.lock("test"), util::RefusedError);
        CHECK(catalog_identity(t / "backup.db").generation == 0); // the refusal wrote nothing
        store::Store missing(t.path(), t / "nothing.db");
        CHECK_THROWS_AS(missing.lock("test"), util::RefusedError);
        CHECK(test::read_file(t / "nothing.db") == "<missing>");
    }
    TEST_CASE("a catalog one generation ahead of the marker is accepted and the marker brought up") {
        test::TempDir t;
        test::make_small_store(t.path());
        std::string id;
        {
            store::Store s(t.path());
            auto lock = s.lock("test");
            id = s.read_marker()->store_id;
        }
        test::write_file(t / "objects/ab/" + std::string(62, 'c'), "x");
        auto set_gen = [&](std::int64_t g) {
            catalog::Db db(t / "store.db", catalog::OpenMode::read_write);
            db.exec("UPDATE store_identity SET generation=" + std::to_string(g));
        };
        set_gen(1); // as a crash between the catalog's commit and the marker's rename leaves it
        {
            store::Store s(t.path());
            s.check_catalog(Purpose::read, "status");
            CHECK(s.read_marker()->generation == 0); // read: nothing written
            auto lock = s.lock("test");
            CHECK(s.read_marker()->generation == 1);
        }
        set_gen(3); // two ahead: the marker is behind, not a crash
        store::Store s(t.path());
        CHECK_THROWS_AS(s.lock("test"), util::RefusedError);
    }
    TEST_CASE("a lost marker is re-created only where there is nothing to lose") {
        test::TempDir t;
        test::make_small_store(t.path());
        {
            store::Store s(t.path());
            auto lock = s.lock("test");
        }
        auto first = marker_text(t);
        std::filesystem::remove(t / "migration/identity");
        {
            store::Store s(t.path());
            auto lock = s.lock("test"); // no objects, no manifests: a crash between claim and marker
            CHECK(marker_text(t) == first);
        }
        std::filesystem::remove(t / "migration/identity");
        test::write_file(t / "objects/ab/" + std::string(62, 'c'), "x");
        store::Store s(t.path());
        CHECK_THROWS_AS(s.lock("test"), util::RefusedError);
        CHECK_THROWS_AS(s.check_catalog(Purpose::read, "status"), util::RefusedError);
    }
    TEST_CASE("a damaged marker is refused") {
        test::TempDir t;
        test::make_small_store(t.path());
        {
            store::Store s(t.path());
            auto lock = s.lock("test");
        }
        auto good = marker_text(t);
        SUBCASE("truncated") { test::write_file(t / "migration/identity", good.substr(0, good.size() - 3)); }
        SUBCASE("empty") { test::write_file(t / "migration/identity", ""); }
        SUBCASE("not hex") { test::write_file(t / "migration/identity", "casmig-store-identity 1\nstore_id XYZ\ngeneration 0\n"); }
        SUBCASE("trailing text") { test::write_file(t / "migration/identity", good + "more\n"); }
        SUBCASE("negative generation") {
            test::write_file(t / "migration/identity", good.substr(0, good.find("generation")) + "generation -1\n");
        }
        store::Store s(t.path());
        CHECK_THROWS_AS(s.read_marker(), util::RefusedError);
        CHECK_THROWS_AS(s.lock("test"), util::RefusedError);
    }
}

TEST_SUITE("store::StoreLock") {
    // flock() locks belong to an open file description: a second open of the file in this process
    // conflicts like another process would.
    struct Holder {
        explicit Holder(const std::string& path, const char* text) {
            fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
            REQUIRE(fd >= 0);
            REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
            REQUIRE(::pwrite(fd, text, std::strlen(text), 0) == static_cast<ssize_t>(std::strlen(text)));
        }
        ~Holder() { release(); }
        void release() {
            if (fd >= 0) ::close(fd);
            fd = -1;
        }
        int fd = -1;
    };
    using namespace std::chrono_literals;
    using Clock = std::chrono::steady_clock;

    TEST_CASE("no wait by default: busy at once, naming the holder") {
        test::TempDir t;
        std::string path = t / "lock";
        Holder h(path, ("casmig migrate pid " + std::to_string(::getpid()) + "\n").c_str());
        auto start = Clock::now();
        try {
            store::StoreLock l(path, store::LockKind::exclusive, "migrate");
            FAIL("the lock was taken while held");
        } catch (const util::BusyError& e) {
            CHECK(std::string(e.what()).find("held by casmig migrate pid " + std::to_string(::getpid())) != std::string::npos);
            CHECK(std::string(e.what()).find("waited") == std::string::npos);
        }
        CHECK(Clock::now() - start < 200ms);
    }
    TEST_CASE("a wait takes the lock once the holder lets go, and says so once") {
        test::TempDir t;
        std::string path = t / "lock";
        Holder h(path, ("casmig migrate pid " + std::to_string(::getpid()) + "\n").c_str());
        std::vector<std::string> told;
        std::thread release([&] {
            std::this_thread::sleep_for(300ms);
            h.release();
        });
        auto start = Clock::now();
        {
            store::StoreLock l(path, store::LockKind::exclusive, "migrate",
                               {5000ms, [&](const std::string& m) { told.push_back(m); }});
            CHECK(Clock::now() - start >= 250ms);
            CHECK(Clock::now() - start < 3000ms);
            CHECK(test::read_file(path) == "casmig migrate pid " + std::to_string(::getpid()) + "\n");
        }
        release.join();
        REQUIRE(told.size() == 1);
        CHECK(told[0] == "waiting up to 5s for " + path + ", held by casmig migrate pid " + std::to_string(::getpid()));
    }
    TEST_CASE("a wait that runs out is busy and says how long it waited; a dead holder's pid is not named") {
        test::TempDir t;
        std::string path = t / "lock";
        // A shared holder writes nothing: the text is an earlier holder's, whose pid is gone.
        pid_t gone = ::fork();
        if (gone == 0) ::_exit(0);
        REQUIRE(gone > 0);
        ::waitpid(gone, nullptr, 0);
        Holder h(path, ("casmig gc pid " + std::to_string(gone) + "\n").c_str());
        auto start = Clock::now();
        try {
            store::StoreLock l(path, store::LockKind::shared, "materialize", {400ms, nullptr});
            FAIL("the lock was taken while held");
        } catch (const util::BusyError& e) {
            std::string m = e.what();
            CHECK(m.find("waited 400ms") != std::string::npos);
            CHECK(m.find("pid " + std::to_string(gone)) == std::string::npos);
        }
        CHECK(Clock::now() - start >= 400ms);
    }
    TEST_CASE("a stop request ends a wait: interrupted, nothing taken") {
        test::TempDir t;
        std::string path = t / "lock";
        Holder h(path, "casmig migrate pid 1\n");
        std::thread stop([] {
            std::this_thread::sleep_for(200ms);
            util::request_stop(SIGTERM);
        });
        auto start = Clock::now();
        try {
            store::StoreLock l(path, store::LockKind::exclusive, "migrate", {10000ms, nullptr});
            FAIL("the lock was taken while held");
        } catch (const util::InterruptedError& e) {
            CHECK(e.signal() == SIGTERM);
            CHECK(std::string(e.what()).find("interrupted (SIGTERM)") != std::string::npos);
        }
        stop.join();
        util::clear_stop();
        CHECK(Clock::now() - start < 5000ms);
    }
}
