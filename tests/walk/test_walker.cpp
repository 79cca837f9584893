#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/walk/walker.hpp"

#include <fcntl.h>
#include <map>
#include <sys/stat.h>

using namespace casmig;

static std::map<std::string, walk::Item> walk_all(const std::string& store, const std::string& pkg) {
    util::Fd fd = util::open_dir(store);
    walk::PackageWalker w(fd.get(), pkg);
    std::map<std::string, walk::Item> out;
    walk::Item it;
    while (w.next(it)) out[it.entry.path] = it;
    return out;
}

TEST_SUITE("walk::PackageWalker") {
    TEST_CASE("odd names are kept as bytes") {
        test::TempDir t;
        std::vector<std::string> names = {"with space", "new\nline", std::string("bad\xff\xfe", 5), "-dash",
                                          std::string(255, 'x'), "\xc3\xbcnic\xc3\xb8" "de"};
        for (auto& n : names) test::write_file(t / ("p/" + n), n);
        auto items = walk_all(t.path(), "p");
        CHECK(items.size() == names.size() + 1);
        for (auto& n : names) {
            CAPTURE(n);
            REQUIRE(items.count(n));
            CHECK(items[n].entry.type == catalog::EntryType::file);
            CHECK(items[n].entry.size == n.size());
        }
        CHECK(items.count(""));
        CHECK(items[""].entry.type == catalog::EntryType::dir);
    }
    TEST_CASE("deep trees beyond PATH_MAX are walked through directory fds") {
        test::TempDir t;
        ::mkdir((t / "p").c_str(), 0755);
        int fd = ::open((t / "p").c_str(), O_RDONLY | O_DIRECTORY);
        std::string comp(200, 'd');
        for (int i = 0; i < 30; ++i) { // 30 * 201 bytes > PATH_MAX
            REQUIRE(::mkdirat(fd, comp.c_str(), 0755) == 0);
            int next = ::openat(fd, comp.c_str(), O_RDONLY | O_DIRECTORY);
            ::close(fd);
            fd = next;
        }
        int f = ::openat(fd, "leaf", O_WRONLY | O_CREAT, 0644);
        ::write(f, "deep", 4);
        ::close(f);
        ::close(fd);
        auto items = walk_all(t.path(), "p");
        CHECK(items.size() == 32);
        bool found = false;
        for (auto& [path, it] : items)
            if (path.size() > 4096 && path.substr(path.size() - 5) == "/leaf") found = it.entry.size == 4;
        CHECK(found);
    }
    TEST_CASE("symlinks are recorded, never followed") {
        test::TempDir t;
        test::write_file(t / "outside/secret", "no");
        ::mkdir((t / "p").c_str(), 0755);
        ::symlink((t / "outside").c_str(), (t / "p/escape").c_str());
        ::symlink("loop", (t / "p/loop").c_str());
        auto items = walk_all(t.path(), "p");
        CHECK(items.size() == 3);
        CHECK(items["escape"].entry.type == catalog::EntryType::symlink);
        CHECK(items["escape"].entry.target == t / "outside");
        CHECK(items.count("escape/secret") == 0);
        CHECK(items["loop"].entry.target == "loop");
    }
    TEST_CASE("a fifo fails the package naming its path") {
        test::TempDir t;
        test::write_file(t / "p/ok", "fine");
        ::mkdir((t / "p/sub").c_str(), 0755);
        ::mkfifo((t / "p/sub/a-fifo").c_str(), 0644);
        util::Fd fd = util::open_dir(t.path());
        walk::PackageWalker w(fd.get(), "p");
        walk::Item it;
        bool threw = false;
        try {
            while (w.next(it)) {
            }
        } catch (const walk::PackageError& e) {
            threw = true;
            CHECK(e.path() == "sub/a-fifo");
            CHECK(std::string(e.what()).find("fifo") != std::string::npos);
        }
        CHECK(threw);
    }
    TEST_CASE("hard links inside a package point at their first path") {
        test::TempDir t;
        test::write_file(t / "p/a", "same inode");
        ::link((t / "p/a").c_str(), (t / "p/b").c_str());
        auto items = walk_all(t.path(), "p");
        CHECK_FALSE(items["a"].entry.link_to);
        REQUIRE(items["b"].entry.link_to);
        CHECK(*items["b"].entry.link_to == "a");
    }
    TEST_CASE("modes with setuid, setgid and sticky bits are kept") {
        test::TempDir t;
        test::write_file(t / "p/suid", "x", 04755);
        ::mkdir((t / "p/sticky").c_str(), 0755);
        ::chmod((t / "p/sticky").c_str(), 01777);
        auto items = walk_all(t.path(), "p");
        CHECK(items["suid"].entry.mode == 04755);
        CHECK(items["sticky"].entry.mode == 01777);
    }
}
