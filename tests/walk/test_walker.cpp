#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/walk/walker.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <map>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
// The runtimes' allocator statistics (declared in <sanitizer/allocator_interface.h>, which GCC 12
// does not ship).
extern "C" std::size_t __sanitizer_get_current_allocated_bytes();
#endif

using namespace casmig;

static std::map<std::string, walk::Item> walk_all(const std::string& store, const std::string& pkg) {
    util::Fd fd = util::open_dir(store);
    walk::PackageWalker w(fd.get(), pkg);
    std::map<std::string, walk::Item> out;
    walk::Item it;
    while (w.next(it)) out[it.entry.path] = it;
    return out;
}

// Bytes the process has allocated and not freed (the sanitizers replace malloc and count for themselves).
static std::size_t heap_in_use() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return __sanitizer_get_current_allocated_bytes();
#else
    return mallinfo2().uordblks;
#endif
}

static size_t open_fds() {
    size_t n = 0;
    DIR* d = ::opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    while (auto* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    return n - 1; // opendir's own
}

// p/d/d/.../d (levels deep, leaf file at the bottom); every 500th level also holds a file "zz", which
// sorts after "d" and so is reached only after the walk came back up to that level.
static void make_deep(const std::string& root, int levels) {
    ::mkdir(root.c_str(), 0755);
    int fd = ::open(root.c_str(), O_RDONLY | O_DIRECTORY);
    for (int i = 0; i < levels; ++i) {
        if (i % 500 == 0) {
            int f = ::openat(fd, "zz", O_WRONLY | O_CREAT, 0644);
            REQUIRE(::write(f, "level", 5) == 5);
            ::close(f);
        }
        REQUIRE(::mkdirat(fd, "d", 0755) == 0);
        int next = ::openat(fd, "d", O_RDONLY | O_DIRECTORY);
        ::close(fd);
        fd = next;
    }
    int f = ::openat(fd, "leaf", O_WRONLY | O_CREAT, 0644);
    REQUIRE(::write(f, "deep", 4) == 4);
    ::close(f);
    ::close(fd);
}

static std::string level_path(int level) { // path of level `level`'s directory ("" for the root)
    std::string p;
    for (int i = 0; i < level; ++i) p += i ? "/d" : "d";
    return p;
}

TEST_SUITE("walk::PackageWalker") {
    TEST_CASE("a deep tree costs memory linear in its depth and a bounded number of fds") {
        constexpr int k_levels = 3000;
        test::TempDir t;
        make_deep(t / "p", k_levels);
        util::Fd store = util::open_dir(t.path());
        const size_t fds_before = open_fds();
        const std::size_t heap_before = heap_in_use();
        std::size_t heap_deepest = 0, fds_deepest = 0;
        std::map<std::string, std::string> zz; // path -> content, read through the item's parent fd
        size_t items = 0;
        {
            walk::PackageWalker w(store.get(), "p");
            walk::Item it;
            while (w.next(it)) {
                ++items;
                if (it.name == "leaf") {
                    heap_deepest = heap_in_use();
                    fds_deepest = open_fds();
                }
                if (it.name == "zz") {
                    char buf[16] = {};
                    int f = ::openat(it.parent->get(), "zz", O_RDONLY | O_NOFOLLOW);
                    REQUIRE(f >= 0);
                    REQUIRE(::read(f, buf, sizeof buf) == 5);
                    ::close(f);
                    zz[it.entry.path] = buf;
                }
            }
        }
        CHECK(items == 1 + k_levels + 1 + zz.size());
        CHECK(zz.size() == 6);
        for (int level = 0; level < k_levels; level += 500) {
            std::string want = level == 0 ? "zz" : level_path(level) + "/zz";
            CAPTURE(level);
            CHECK(zz[want] == "level");
        }
        // The paths alone at every level would be 3000 * 6000 bytes on average: 18 MB. The walker's own
        // state (one path, a frame per level) is a few hundred kB.
        CHECK(heap_deepest - heap_before < 2u << 20);
        CHECK(fds_deepest - fds_before <= walk::k_open_dirs + 1); // + the leaf item's parent
    }
    TEST_CASE("an ancestor replaced by a symlink while the walk is below it is never followed") {
        // p/a/b/c/... deep; while the walk is at the bottom, a is moved to a.old and replaced by a
        // symlink to a.old, and b moved out of it: coming back up, the walker must not reach a through
        // the symlink (which leads to the right directory: only O_NOFOLLOW tells it apart).
        test::TempDir t;
        ::mkdir((t / "p").c_str(), 0755);
        ::mkdir((t / "p/y").c_str(), 0755);
        make_deep(t / "p/a", walk::k_open_dirs * 3);
        test::write_file(t / "p/a/zz2", "after");
        util::Fd store = util::open_dir(t.path());
        walk::PackageWalker w(store.get(), "p");
        walk::Item it;
        bool moved = false;
        std::string error;
        try {
            while (w.next(it)) {
                CHECK(it.entry.path != "a/zz2");
                if (it.name == "leaf") {
                    REQUIRE(::rename((t / "p/a").c_str(), (t / "p/a.old").c_str()) == 0);
                    REQUIRE(::symlink("a.old", (t / "p/a").c_str()) == 0);
                    REQUIRE(::rename((t / "p/a.old/d").c_str(), (t / "p/y/d").c_str()) == 0);
                    moved = true;
                }
            }
        } catch (const walk::PackageError& e) {
            error = e.what();
            CHECK(e.path() == "a");
        }
        CHECK(moved);
        CHECK(error.find("moved or replaced") != std::string::npos);
        CHECK_FALSE(w.next(it)); // the walk is over, not stuck on the error
    }

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
            CHECK(items[n].entry.type == manifest::EntryType::file);
            CHECK(items[n].entry.size == n.size());
        }
        CHECK(items.count(""));
        CHECK(items[""].entry.type == manifest::EntryType::dir);
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
        CHECK(items["escape"].entry.type == manifest::EntryType::symlink);
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
