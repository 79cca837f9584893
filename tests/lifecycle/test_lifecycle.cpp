#include <doctest/doctest.h>

#include "../support/fixture.hpp"
#include "casmig/lifecycle/lifecycle.hpp"
#include "casmig/migrate/pipeline.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/verify/verify.hpp"

#include <csignal>
#include <fcntl.h>
#include <filesystem>
#include <sys/stat.h>

using namespace casmig;
using catalog::PackageState;
using catalog::TreeState;

namespace {

struct Migrated {
    test::TempDir dir;
    test::TempDir elsewhere; // materialize destinations: never inside the store (materialize refuses that)
    std::unique_ptr<store::Store> store;
    std::unique_ptr<store::StoreLock> lock;
    Migrated() {
        test::make_small_store(dir.path());
        test::write_file(dir / "pkg0/bin/suid", "setuid tool", 04755);
        test::write_file(dir / "pkg0/private", "secret", 0600);
        ::link((dir / "pkg0/LICENSE").c_str(), (dir / "pkg0/LICENSE.hard").c_str());
        struct timespec ts[2] = {{1'600'000'000, 123}, {1'600'000'000, 456}};
        ::utimensat(AT_FDCWD, (dir / "pkg0/bin/tool").c_str(), ts, 0);
        store = std::make_unique<store::Store>(dir.path());
        lock = store->lock("test");
        auto r = migrate::migrate(*store, {}, nullptr, nullptr);
        REQUIRE(r.verified == 3);
    }
    std::string snapshot(const std::string& root) {
        // path type mode size content-hash target mtime, one line each, sorted
        std::string cmd = "cd '" + root + "' && find . -printf '%p %y %m %s %l %T@\\n' | sort && find . -type f -exec b3sum {} + | sort";
        FILE* p = ::popen(cmd.c_str(), "r");
        std::string out;
        char buf[4096];
        while (std::fgets(buf, sizeof buf, p)) out += buf;
        ::pclose(p);
        return out;
    }
};

std::string trash_of(const catalog::Package& p) {
    hash::Hasher h;
    h.update(p.name.data(), p.name.size());
    return "trash-" + std::to_string(p.id) + "-" + h.finish().hex().substr(0, 16);
}

std::vector<Problem> g_problems;
ProblemSink collect() {
    g_problems.clear();
    return [](const Problem& p) { g_problems.push_back(p); };
}

} // namespace

TEST_SUITE("lifecycle") {
    TEST_CASE("materialize --link copy rebuilds a package exactly, mtimes and setuid included") {
        Migrated m;
        std::string before = m.snapshot(m.dir / "pkg0");
        auto r = lifecycle::materialize(*m.store, "pkg0", m.elsewhere / "out", lifecycle::LinkMode::copy);
        CHECK(r.files == 6);
        CHECK(m.snapshot(m.elsewhere / "out") == before);
        struct stat a {}, b {};
        ::stat((m.elsewhere / "out/LICENSE").c_str(), &a);
        ::stat((m.elsewhere / "out/LICENSE.hard").c_str(), &b);
        CHECK(a.st_ino == b.st_ino); // the hard link inside the package is kept
    }
    TEST_CASE("materialize handles more directories than its fd cache, with hard links across them") {
        test::TempDir t;
        for (int i = 0; i < 300; ++i) test::write_file(t / ("big/d" + std::to_string(i) + "/f"), "file " + std::to_string(i));
        ::link((t / "big/d0/f").c_str(), (t / "big/d299/link").c_str());
        store::Store s(t.path());
        auto lock = s.lock("test");
        REQUIRE(migrate::migrate(s, {}, nullptr, nullptr).verified == 1);
        test::TempDir o;
        auto r = lifecycle::materialize(s, "big", o / "out", lifecycle::LinkMode::copy);
        CHECK(r.files == 301);
        CHECK(r.dirs == 300);
        CHECK(test::read_file(o / "out/d150/f") == "file 150");
        struct stat a {}, b {};
        ::stat((o / "out/d0/f").c_str(), &a);
        ::stat((o / "out/d299/link").c_str(), &b);
        CHECK(a.st_ino == b.st_ino);
    }
    TEST_CASE("materialize --link hardlink links objects but never setuid files and keeps exec bits") {
        Migrated m;
        auto r = lifecycle::materialize(*m.store, "pkg0", m.elsewhere / "out", lifecycle::LinkMode::hardlink);
        CHECK(r.linked >= 3);
        struct stat suid {}, tool {}, priv {};
        ::stat((m.elsewhere / "out/bin/suid").c_str(), &suid);
        CHECK(suid.st_nlink == 1);
        CHECK((suid.st_mode & 07777) == 04755);
        ::stat((m.elsewhere / "out/bin/tool").c_str(), &tool);
        CHECK((tool.st_mode & 0111) == 0111);
        CHECK(tool.st_nlink >= 2);
        ::stat((m.elsewhere / "out/private").c_str(), &priv);
        CHECK((priv.st_mode & 0077) == 0); // a private file stays private
        CHECK(test::read_file(m.elsewhere / "out/private") == "secret");
    }
    TEST_CASE("materialize refuses a crafted manifest that would write through a symlink") {
        Migrated m;
        auto& cat = m.store->catalog();
        auto id = cat.add_package("crafted");
        std::vector<catalog::Entry> es(3);
        es[0].path = "";
        es[0].type = catalog::EntryType::dir;
        es[0].mode = 0755;
        es[1].path = "a";
        es[1].type = catalog::EntryType::symlink;
        es[1].target = m.dir / "victim";
        es[2].path = "a/x";
        es[2].type = catalog::EntryType::file;
        es[2].mode = 0644;
        es[2].size = 0;
        es[2].digest = hash::hash_bytes("");
        cat.put_manifest(id, es, std::nullopt);
        util::ensure_dir(m.dir / "victim");
        CHECK_THROWS_AS(lifecycle::materialize(*m.store, "crafted", m.elsewhere / "out", lifecycle::LinkMode::copy), util::Error);
        struct stat st {};
        CHECK(::lstat((m.dir / "victim/x").c_str(), &st) != 0);
    }
    TEST_CASE("materialize refuses a non-empty destination and an unknown package") {
        Migrated m;
        test::write_file(m.elsewhere / "busy/file", "x");
        CHECK_THROWS_AS(lifecycle::materialize(*m.store, "pkg0", m.elsewhere / "busy", lifecycle::LinkMode::copy), util::UsageError);
        CHECK_THROWS_AS(lifecycle::materialize(*m.store, "nope", m.elsewhere / "new", lifecycle::LinkMode::copy), util::UsageError);
    }
    TEST_CASE("cutover refuses while a package is not verified, and changes nothing") {
        Migrated m;
        test::write_file(m.dir / "late/file", "new package");
        CHECK_THROWS_AS(lifecycle::cutover(*m.store, 0, nullptr, collect()), util::RefusedError);
        CHECK(m.store->catalog().mode() == catalog::StoreMode::dual);
        for (auto& p : m.store->catalog().packages()) CHECK(p.tree == TreeState::present);
    }
    TEST_CASE("a tree cleanup moved aside but did not record comes back under its name, then cleanup finishes") {
        Migrated m;
        std::string before = m.snapshot(m.dir / "pkg1");
        CHECK_THROWS_AS(lifecycle::cleanup(*m.store, lifecycle::DryRun::no, 0, nullptr, collect()), util::RefusedError);
        lifecycle::cutover(*m.store, 0, nullptr, collect());
        // Crash point: the tree was renamed into temp/ but the catalog still says marked.
        auto p = m.store->catalog().package("pkg1");
        REQUIRE(::rename((m.dir / "pkg1").c_str(), (m.dir / ("temp/" + trash_of(*p))).c_str()) == 0);
        m.lock.reset();
        m.lock = m.store->lock("test");
        auto rec = lifecycle::recover(*m.store, collect());
        CHECK(rec.restored == 1);
        CHECK(m.snapshot(m.dir / "pkg1") == before);
        auto r = lifecycle::cleanup(*m.store, lifecycle::DryRun::no, 0, nullptr, collect());
        CHECK(g_problems.empty());
        CHECK(r.trees == 3);
        for (auto& pk : m.store->catalog().packages()) CHECK(pk.tree == TreeState::removed);
        auto mr = lifecycle::materialize(*m.store, "pkg1", m.elsewhere / "back", lifecycle::LinkMode::copy);
        CHECK(mr.files == 3);
        CHECK(m.snapshot(m.elsewhere / "back") == before);
    }
    TEST_CASE("cleanup keeps a tree whose objects are missing") {
        Migrated m;
        lifecycle::cutover(*m.store, 0, nullptr, collect());
        auto man = m.store->catalog().manifest(m.store->catalog().package("pkg2")->id);
        for (auto& e : man)
            if (e.path == "bin/tool") ::unlink((m.dir / ("objects/" + cas::object_relpath(*e.digest))).c_str());
        auto r = lifecycle::cleanup(*m.store, lifecycle::DryRun::no, 0, nullptr, collect());
        // The legacy file still matches the manifest: the object is rewritten from it, then deleted.
        CHECK(r.skipped == 0);
        CHECK(r.trees == 3);
        REQUIRE(g_problems.size() == 1);
        CHECK(g_problems[0].package == "pkg2");
        CHECK(g_problems[0].message.find("repaired") != std::string::npos);
        auto mr = lifecycle::materialize(*m.store, "pkg2", m.elsewhere / "back", lifecycle::LinkMode::copy);
        CHECK(mr.files == 3);
    }
    TEST_CASE("cleanup keeps a tree whose object is missing and whose legacy file changed too") {
        Migrated m;
        lifecycle::cutover(*m.store, 0, nullptr, collect());
        auto man = m.store->catalog().manifest(m.store->catalog().package("pkg2")->id);
        for (auto& e : man)
            if (e.path == "bin/tool") ::unlink((m.dir / ("objects/" + cas::object_relpath(*e.digest))).c_str());
        test::write_file(m.dir / "pkg2/bin/tool", "#!/bin/sh\necho TOOL 2\n", 0755); // same size, other bytes
        auto r = lifecycle::cleanup(*m.store, lifecycle::DryRun::no, 0, nullptr, collect());
        CHECK(r.skipped == 1);
        REQUIRE(!g_problems.empty());
        for (auto& pr : g_problems) CHECK(pr.package == "pkg2");
        struct stat st {};
        CHECK(::stat((m.dir / "pkg2/bin/tool").c_str(), &st) == 0);
    }
    TEST_CASE("rollback after cleanup rebuilds exactly, also after a crash mid-rollback") {
        Migrated m;
        std::string before0 = m.snapshot(m.dir / "pkg0"), before1 = m.snapshot(m.dir / "pkg1");
        lifecycle::cutover(*m.store, 0, nullptr, collect());
        lifecycle::cleanup(*m.store, lifecycle::DryRun::no, 0, nullptr, collect());
        // Crash points: pkg0 was rebuilt and renamed into place but not recorded; a half-built
        // staging tree of pkg1 was left in temp/.
        lifecycle::materialize(*m.store, "pkg0", m.elsewhere / "pkg0", lifecycle::LinkMode::copy);
        REQUIRE(::rename((m.elsewhere / "pkg0").c_str(), (m.dir / "pkg0").c_str()) == 0);
        test::write_file(m.dir / ("temp/rollback-" + std::to_string(m.store->catalog().package("pkg1")->id) + "/half"), "x");
        m.lock.reset();
        m.lock = m.store->lock("test");
        lifecycle::recover(*m.store, collect());
        auto r = lifecycle::rollback(*m.store, 0, lifecycle::SpaceCheck::yes, nullptr, collect());
        CHECK(r.rebuilt == 2);
        CHECK(m.store->catalog().mode() == catalog::StoreMode::legacy);
        CHECK(m.snapshot(m.dir / "pkg0") == before0);
        CHECK(m.snapshot(m.dir / "pkg1") == before1);
        for (auto& p : m.store->catalog().packages()) {
            CHECK(p.state == PackageState::rolled_back);
            CHECK(p.tree == TreeState::present);
        }
        // idempotent
        CHECK(lifecycle::rollback(*m.store, 0, lifecycle::SpaceCheck::yes, nullptr, collect()).rebuilt == 0);
        // and a later migrate re-migrates cheaply: no new objects
        auto again = migrate::migrate(*m.store, {}, nullptr, nullptr);
        CHECK(again.verified == 3);
        CHECK(again.new_objects == 0);
    }
    TEST_CASE("remove then gc deletes exactly the objects only that package used") {
        Migrated m;
        auto before = m.store->catalog().totals().objects;
        auto dry = lifecycle::gc(*m.store, lifecycle::DryRun::yes);
        CHECK(dry.removed_objects == 0);
        lifecycle::remove_package(*m.store, "pkg0");
        struct stat st {};
        CHECK(::stat((m.dir / "pkg0").c_str(), &st) != 0);
        CHECK_FALSE(m.store->catalog().package("pkg0"));
        auto r = lifecycle::gc(*m.store, lifecycle::DryRun::no);
        CHECK(r.removed_objects == 3); // pkg0's own tool, suid and private contents
        CHECK(m.store->catalog().totals().objects == before - 3);
        auto out = lifecycle::materialize(*m.store, "pkg1", m.elsewhere / "still", lifecycle::LinkMode::copy);
        CHECK(out.files == 3);
    }
}

TEST_SUITE("stop requests") {
    // util::request_stop as the CLI's SIGINT/SIGTERM handler makes it; cleared even when a check fails.
    struct Stop {
        Stop() { util::request_stop(SIGINT); }
        ~Stop() { util::clear_stop(); }
    };
    // What the lifecycle left in temp/ (the process's own casmig-<pid>-<hex>/ staging directory lives
    // as long as the store object).
    std::vector<std::string> lifecycle_temp(store::Store& s) {
        std::vector<std::string> out;
        for (const auto& e : std::filesystem::directory_iterator(s.temp_dir()))
            if (e.path().filename().string().rfind("casmig-", 0) != 0) out.push_back(e.path().filename().string());
        return out;
    }
    TEST_CASE("verify, cleanup, rollback and add start nothing after a stop request and say what is left") {
        Migrated m;
        auto& s = *m.store;
        auto pkgs = s.catalog().packages();
        {
            Stop stop;
            auto v = verify::verify_packages(s, pkgs, {}, nullptr, nullptr);
            CHECK(v.interrupted);
            CHECK(v.left == 3);
            CHECK(v.packages == 0);
        }
        lifecycle::cutover(s, 0, nullptr, nullptr);
        {
            Stop stop;
            auto c = lifecycle::cleanup(s, lifecycle::DryRun::no, 0, nullptr, nullptr);
            CHECK(c.interrupted);
            CHECK(c.left == 3);
            CHECK(c.trees == 0);
            CHECK(c.skipped == 0);
        }
        for (auto& p : s.catalog().packages()) CHECK(p.tree == TreeState::marked);
        CHECK(lifecycle_temp(s).empty());
        CHECK_FALSE(lifecycle::cleanup(s, lifecycle::DryRun::no, 0, nullptr, nullptr).interrupted);
        {
            Stop stop;
            auto r = lifecycle::rollback(s, 0, lifecycle::SpaceCheck::yes, nullptr, nullptr);
            CHECK(r.interrupted);
            CHECK(r.left == 3);
            CHECK(r.failed == 0);
            CHECK(s.catalog().mode() == catalog::StoreMode::file_level);
        }
        CHECK(lifecycle_temp(s).empty());
        auto back = lifecycle::rollback(s, 0, lifecycle::SpaceCheck::yes, nullptr, nullptr);
        CHECK_FALSE(back.interrupted);
        CHECK(back.rebuilt == 3);
        CHECK(s.catalog().mode() == catalog::StoreMode::legacy);
        test::write_file(m.elsewhere / "stage/bin/new", "new tool", 0755);
        {
            Stop stop;
            auto a = lifecycle::add_package(s, "newpkg", m.elsewhere / "stage", 0, nullptr);
            CHECK(a.interrupted);
            CHECK_FALSE(s.catalog().package("newpkg"));
        }
        CHECK_FALSE(lifecycle::add_package(s, "newpkg", m.elsewhere / "stage", 0, nullptr).interrupted);
        CHECK(s.catalog().package("newpkg"));
    }
}
