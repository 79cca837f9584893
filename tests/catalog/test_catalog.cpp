#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/catalog/catalog.hpp"

using namespace casmig;
using namespace casmig::catalog;

/// Puts a catalog back to what a binary without migration 0006 (verify failures) left.
static void undo_verify_failures(catalog::Catalog& c) {
    for (const char* sql : {"ALTER TABLE packages DROP COLUMN verify_error", "ALTER TABLE packages DROP COLUMN verify_failed_at",
                            "DELETE FROM schema_migrations WHERE name = '0006-verify-failures'", "PRAGMA user_version=5"})
        c.db().exec(sql);
}

/// Puts a catalog back to what a binary without migration 0005 (object totals) left.
static void undo_object_totals(catalog::Catalog& c) {
    undo_verify_failures(c);
    for (const char* sql : {"DROP TRIGGER object_totals_insert", "DROP TRIGGER object_totals_delete",
                            "DROP TRIGGER object_totals_update", "DROP TABLE object_totals",
                            "DELETE FROM schema_migrations WHERE name = '0005-object-totals'", "PRAGMA user_version=4"})
        c.db().exec(sql);
}

TEST_SUITE("catalog::Catalog") {
    TEST_CASE("a new catalog runs every named migration once") {
        test::TempDir t;
        {
            Catalog c(t / "store.db", OpenMode::read_write);
            Stmt v(c.db(), "PRAGMA user_version");
            REQUIRE(v.step());
            CHECK(v.i64(0) == schema_version());
            Stmt m(c.db(), "SELECT COUNT(*), MIN(name) FROM schema_migrations");
            REQUIRE(m.step());
            CHECK(m.i64(0) == schema_version());
            CHECK(m.str(1) == "0001-initial");
            Stmt j(c.db(), "PRAGMA journal_mode");
            REQUIRE(j.step());
            CHECK(j.str(0) == "wal");
            CHECK(c.mode() == StoreMode::legacy);
        }
        // Reopening does not re-run migrations.
        Catalog again(t / "store.db", OpenMode::read_write);
        Stmt m(again.db(), "SELECT COUNT(*) FROM schema_migrations");
        REQUIRE(m.step());
        CHECK(m.i64(0) == schema_version());
    }
    TEST_CASE("migration 0005 counts the objects a catalog made before it holds; triggers keep the totals") {
        test::TempDir t;
        auto a = hash::hash_bytes("a"), b = hash::hash_bytes("b"), c3 = hash::hash_bytes("c");
        {
            Catalog c(t / "store.db", OpenMode::read_write);
            c.add_object({a, 100, 40});
            c.add_object({b, 7, 7});
            undo_object_totals(c); // as a binary without 0005 leaves it
        }
        Catalog c(t / "store.db", OpenMode::read_write);
        auto t0 = c.totals();
        CHECK(t0.objects == 2);
        CHECK(t0.object_bytes == 107);
        CHECK(t0.stored_bytes == 47);
        c.add_object({c3, 1000, 300});
        c.add_object({a, 100, 40}); // INSERT OR IGNORE of a row already there: counted once
        c.delete_object(b);
        c.db().exec("UPDATE objects SET stored_size = 100 WHERE size = 100"); // a conversion back to raw
        auto t1 = c.totals();
        CHECK(t1.objects == 2);
        CHECK(t1.object_bytes == 1100);
        CHECK(t1.stored_bytes == 400);
        Stmt scan(c.db(), "SELECT COUNT(*), SUM(size), SUM(stored_size) FROM objects");
        REQUIRE(scan.step());
        CHECK(scan.i64(0) == t1.objects);
        CHECK(scan.i64(1) == t1.object_bytes);
        CHECK(scan.i64(2) == t1.stored_bytes);
    }
    TEST_CASE("migration 0006 adds the verify-failure columns; set_state and a passing verify clear them") {
        test::TempDir t;
        std::int64_t id = 0;
        {
            Catalog c(t / "store.db", OpenMode::read_write);
            id = c.add_package("pkg");
            c.set_state(id, PackageState::verified);
            undo_verify_failures(c); // as a binary without 0006 leaves it
        }
        Catalog c(t / "store.db", OpenMode::read_write);
        auto p = c.package("pkg");
        REQUIRE(p);
        CHECK(p->state == PackageState::verified);
        CHECK(p->verify_error.empty());
        CHECK(p->verify_failed_at_ns == 0);
        c.set_verify_failure(id, "verify: package pkg: f: object x is missing from objects/");
        p = c.package("pkg");
        CHECK(p->verify_error == "verify: package pkg: f: object x is missing from objects/");
        CHECK(p->verify_failed_at_ns > 0);
        CHECK(p->state == PackageState::verified); // the state stays
        c.set_verify_failure(id, "");
        CHECK(c.package("pkg")->verify_error.empty());
        c.set_verify_failure(id, "verify: again");
        c.set_state(id, PackageState::rolled_back); // a new state is a new truth
        CHECK(c.package("pkg")->verify_error.empty());
        CHECK(c.package("pkg")->verify_failed_at_ns == 0);
    }
    TEST_CASE("migration 0004 adds entries.xlink to a catalog made before it, its rows keep no group") {
        test::TempDir t;
        std::int64_t id = 0;
        {
            // The catalog as a binary without 0004 leaves it: no xlink column, user_version one lower.
            Catalog c(t / "store.db", OpenMode::read_write);
            id = c.add_package("pkg");
            std::vector<Entry> es(2);
            es[0].type = EntryType::dir;
            es[0].mode = 0755;
            es[1].path = "f";
            es[1].mode = 0644;
            es[1].size = 1;
            es[1].digest = hash::hash_bytes("x");
            c.put_manifest(id, es, std::nullopt);
            undo_object_totals(c);
            c.db().exec("ALTER TABLE entries DROP COLUMN xlink");
            c.db().exec("DELETE FROM schema_migrations WHERE name = '0004-cross-package-links'");
            c.db().exec("PRAGMA user_version=3");
        }
        Catalog c(t / "store.db", OpenMode::read_write);
        Stmt m(c.db(), "SELECT COUNT(*) FROM schema_migrations WHERE name = '0004-cross-package-links'");
        REQUIRE(m.step());
        CHECK(m.i64(0) == 1);
        auto back = c.manifest(id);
        REQUIRE(back.size() == 2);
        CHECK(back[1].path == "f");
        CHECK_FALSE(back[1].xlink);
        CHECK(back[1].digest == hash::hash_bytes("x"));
    }
    TEST_CASE("a catalog from a newer casmig is refused") {
        test::TempDir t;
        {
            Catalog c(t / "store.db", OpenMode::read_write);
            c.db().exec("PRAGMA user_version=99");
        }
        CHECK_THROWS_WITH_AS(Catalog(t / "store.db", OpenMode::read_write), doctest::Contains("upgrade casmig"), util::Error);
        // status (read-only) says the same: the catalog is newer, casmig is what needs upgrading.
        CHECK_THROWS_WITH_AS(Catalog(t / "store.db", OpenMode::read_only), doctest::Contains("upgrade casmig"), util::Error);
    }
    TEST_CASE("manifests round-trip byte paths, modes, targets, owners and hard links") {
        test::TempDir t;
        Catalog c(t / "store.db", OpenMode::read_write);
        auto id = c.add_package(std::string("pkg\xff\n", 5));
        std::vector<Entry> es(4);
        es[0].path = "";
        es[0].type = EntryType::dir;
        es[0].mode = 0755;
        es[1].path = std::string("bad\xfe name\n", 10);
        es[1].type = EntryType::file;
        es[1].mode = 04755;
        es[1].size = 3;
        es[1].digest = hash::hash_bytes("abc");
        es[1].mtime_ns = 1'600'000'000'123'456'789;
        es[1].uid = 1000;
        es[1].gid = 100;
        es[2].path = "link";
        es[2].type = EntryType::symlink;
        es[2].target = "../../etc/passwd";
        es[2].mode = 0777;
        es[3] = es[1];
        es[3].path = "twin";
        es[3].link_to = es[1].path;
        es[1].xlink = es[3].xlink = xlink_group(2049, 123456789); // a group across packages
        c.put_manifest(id, es, std::nullopt);
        auto back = c.manifest(id);
        REQUIRE(back.size() == 4);
        auto p = c.package(std::string("pkg\xff\n", 5));
        REQUIRE(p);
        CHECK(p->has_manifest);
        CHECK(p->files == 2);
        CHECK(p->bytes == 6);
        for (auto& b : back) {
            if (b.path == es[1].path) {
                CHECK(b.mode == 04755);
                CHECK(b.digest == es[1].digest);
                CHECK(b.mtime_ns == es[1].mtime_ns);
                CHECK(b.uid == 1000);
                CHECK_FALSE(b.link_to);
                CHECK(b.xlink == es[1].xlink);
            } else if (b.path == "link") {
                CHECK(b.type == EntryType::symlink);
                CHECK(b.target == "../../etc/passwd");
                CHECK_FALSE(b.xlink);
            } else if (b.path == "twin") {
                REQUIRE(b.link_to);
                CHECK(*b.link_to == es[1].path);
                CHECK(b.xlink == es[1].xlink);
            } else {
                CHECK(b.path.empty());
                CHECK(b.type == EntryType::dir);
            }
        }
        // The group id is a function of (st_dev, st_ino) alone, never negative.
        CHECK(xlink_group(2049, 123456789) == xlink_group(2049, 123456789));
        CHECK(xlink_group(2049, 123456789) != xlink_group(2049, 123456788));
        CHECK(xlink_group(2050, 123456789) != xlink_group(2049, 123456789));
        CHECK(xlink_group(~0ull, ~0ull) >= 0);
        c.clear_manifest(id);
        CHECK(c.manifest(id).empty());
        CHECK_FALSE(c.package(std::string("pkg\xff\n", 5))->has_manifest);
    }
    TEST_CASE("a transaction rolls back unless committed; the journal records who") {
        test::TempDir t;
        Catalog c(t / "store.db", OpenMode::read_write);
        {
            Transaction tx(c.db());
            c.add_package("never");
        }
        CHECK_FALSE(c.package("never"));
        {
            Transaction tx(c.db());
            auto id = c.add_package("kept");
            c.set_state(id, PackageState::failed, "boom");
            c.journal("test", "kept", "pending", "failed", "boom");
            tx.commit();
        }
        auto p = c.package("kept");
        REQUIRE(p);
        CHECK(p->state == PackageState::failed);
        CHECK(p->error == "boom");
        auto j = c.journal_tail(1);
        REQUIRE(j.size() == 1);
        CHECK(j[0].command == "test");
        CHECK(j[0].who.find("pid") != std::string::npos);
    }
    TEST_CASE("unreferenced_objects lists objects no manifest uses") {
        test::TempDir t;
        Catalog c(t / "store.db", OpenMode::read_write);
        auto used = hash::hash_bytes("used"), unused = hash::hash_bytes("unused");
        c.add_object({used, 4, 4});
        c.add_object({unused, 6, 6});
        auto id = c.add_package("p");
        Entry e;
        e.path = "f";
        e.type = EntryType::file;
        e.size = 4;
        e.digest = used;
        c.put_manifest(id, {e}, std::nullopt);
        auto un = c.unreferenced_objects();
        REQUIRE(un.size() == 1);
        CHECK(un[0].digest == unused);
        auto tot = c.totals();
        CHECK(tot.objects == 2);
        CHECK(tot.stored_bytes == 10);
        CHECK(tot.logical_bytes == 4);
    }

    TEST_CASE("is_path_component accepts one component only") {
        CHECK(is_path_component("pkg"));
        CHECK(is_path_component(std::string("pkg\xff\n", 5)));
        CHECK(is_path_component(".hidden")); // the store refuses it as reserved, not as a path
        CHECK(is_path_component(std::string(255, 'x')));
        CHECK_FALSE(is_path_component(""));
        CHECK_FALSE(is_path_component("."));
        CHECK_FALSE(is_path_component(".."));
        CHECK_FALSE(is_path_component("../victim"));
        CHECK_FALSE(is_path_component("a/b"));
        CHECK_FALSE(is_path_component("/abs"));
        CHECK_FALSE(is_path_component(std::string("a\0b", 3)));
        CHECK_FALSE(is_path_component(std::string(256, 'x')));
    }
    TEST_CASE("a package row whose name is not one path component is refused when read") {
        test::TempDir t;
        Catalog c(t / "store.db", OpenMode::read_write);
        c.add_package("good");
        c.add_package("../victim");
        CHECK_THROWS_AS(c.packages(), util::RefusedError);
        CHECK_THROWS_AS(c.package("../victim"), util::RefusedError);
        CHECK(c.package("good")); // the statement was reset: the catalog stays usable
        try {
            c.packages();
        } catch (const util::RefusedError& e) {
            CHECK(std::string(e.what()).find("invalid package name '../victim'") != std::string::npos);
        }
    }
    TEST_CASE("a catalog is claimed once; its generation advances by one") {
        test::TempDir t;
        Catalog c(t / "store.db", OpenMode::read_write);
        CHECK_FALSE(c.identity());
        CHECK_THROWS_AS(c.advance_generation(), util::Error);
        c.claim({"0123456789abcdef0123456789abcdef", 4});
        CHECK_THROWS_AS(c.claim({"fedcba9876543210fedcba9876543210", 0}), DbError);
        CHECK(c.advance_generation() == 5);
        CHECK(c.advance_generation() == 6);
        auto id = c.identity();
        REQUIRE(id);
        CHECK(id->store_id == "0123456789abcdef0123456789abcdef");
        CHECK(id->generation == 6);
    }
    TEST_CASE("inspect tells what a catalog file is without changing it") {
        test::TempDir t;
        auto all = [](std::string_view) { return true; };
        SUBCASE("missing") {
            CHECK(inspect(t / "store.db", IntegrityCheck::no, all).kind == Inspection::Kind::missing);
        }
        SUBCASE("zero bytes") {
            test::write_file(t / "store.db", "");
            CHECK(inspect(t / "store.db", IntegrityCheck::yes, all).kind == Inspection::Kind::empty);
        }
        SUBCASE("a database without tables") {
            { Db db(t / "store.db", OpenMode::read_write); db.exec("PRAGMA user_version=0"); db.exec("VACUUM"); }
            CHECK(inspect(t / "store.db", IntegrityCheck::no, all).kind == Inspection::Kind::empty);
        }
        SUBCASE("not a database") {
            test::write_file(t / "store.db", std::string(8192, 'x'));
            auto r = inspect(t / "store.db", IntegrityCheck::no, all);
            CHECK(r.kind == Inspection::Kind::unreadable);
            CHECK(r.problem == "file is not a database");
        }
        SUBCASE("unclaimed, then claimed, with rows and a bad name") {
            {
                Catalog c(t / "store.db", OpenMode::read_write);
                auto r = inspect(t / "store.db", IntegrityCheck::yes, all);
                CHECK(r.kind == Inspection::Kind::unclaimed);
                CHECK_FALSE(r.has_rows);
                CHECK(r.integrity.empty());
                c.claim({"0123456789abcdef0123456789abcdef", 2});
                c.add_package("ok");
                c.add_package("objects");
            }
            auto r = inspect(t / "store.db", IntegrityCheck::yes, [](std::string_view n) { return n != "objects"; });
            CHECK(r.kind == Inspection::Kind::claimed);
            REQUIRE(r.identity);
            CHECK(r.identity->generation == 2);
            CHECK(r.has_rows);
            CHECK(r.bad_name == std::optional<std::string>("objects"));
            CHECK(r.version == schema_version());
        }
    }
}
