#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/ingest/ingest.hpp"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>

using namespace casmig;

static walk::Item first_file(int store_fd, const std::string& pkg) {
    walk::PackageWalker w(store_fd, pkg);
    walk::Item it;
    while (w.next(it))
        if (it.entry.type == manifest::EntryType::file) return it;
    FAIL("no file");
    return it;
}

TEST_SUITE("ingest::ingest_file") {
    TEST_CASE("stores exactly the bytes it hashes, small and streamed") {
        test::TempDir t;
        util::ensure_dir(t / "objects");
        util::ensure_dir(t / "temp");
        for (int i = 0; i < 256; ++i) {
            char b[3];
            std::snprintf(b, sizeof b, "%02x", i);
            util::ensure_dir(t / ("objects/" + std::string(b)));
        }
        cas::ObjectStore objects(t / "objects", t / "temp");
        util::Fd root = util::open_dir(t.path());
        // Buffered (small), O_DIRECT whole-file (aligned and with an unaligned tail) and streamed
        // (over 8 MiB, with a tail): every byte lands in the object, at its offset.
        for (size_t size : {size_t(0), size_t(10), size_t(64 << 10), size_t((64 << 10) + 123), size_t(3 << 20),
                            size_t((9 << 20) + 7)}) {
            CAPTURE(size);
            std::string data(size, '\0');
            std::uint32_t x = 2463534242u + static_cast<std::uint32_t>(size);
            for (auto& c : data) {
                x ^= x << 13, x ^= x >> 17, x ^= x << 5;
                c = static_cast<char>(x);
            }
            std::string pkg = "p" + std::to_string(size);
            test::write_file(t / (pkg + "/f"), data);
            auto item = first_file(root.get(), pkg);
            auto r = ingest::ingest_file(item, &objects, ingest::StoreObject::yes, nullptr);
            CHECK(r.new_object);
            CHECK(r.size == size);
            CHECK(objects.staged_count() == 1);
            CHECK(r.digest == hash::hash_bytes(data));
            objects.publish();
            CHECK(test::read_file(t / ("objects/" + cas::object_relpath(r.digest))) == data);
        }
    }
    TEST_CASE("a file changed between walk and read fails with its path") {
        test::TempDir t;
        test::write_file(t / "p/grows", "before");
        util::Fd root = util::open_dir(t.path());
        auto item = first_file(root.get(), "p");
        test::write_file(t / "p/grows", "after the walk, longer");
        try {
            ingest::hash_file(item);
            FAIL("no error for a changed file");
        } catch (const walk::PackageError& e) {
            CHECK(e.path() == "grows");
            CHECK(std::string(e.what()).find("changed") != std::string::npos);
        }
    }
    TEST_CASE("a file replaced by a symlink after the walk is not followed") {
        test::TempDir t;
        test::write_file(t / "p/f", "regular");
        test::write_file(t / "secret", "do not read");
        util::Fd root = util::open_dir(t.path());
        auto item = first_file(root.get(), "p");
        ::unlink((t / "p/f").c_str());
        ::symlink((t / "secret").c_str(), (t / "p/f").c_str());
        CHECK_THROWS_AS(ingest::hash_file(item), walk::PackageError);
        // The open itself refuses the symlink (ELOOP): casmig never opens a file outside the package,
        // even when the change check after the read would catch it.
        errno = 0;
        CHECK(!ingest::try_open_item(item));
        CHECK(errno == ELOOP);
        CHECK_THROWS_AS(ingest::open_item(item), walk::PackageError);
    }
    TEST_CASE("a same-size edit in place after the walk fails, read whole or streamed") {
        // Size and content length agree after the read: only the fstat compared with the walk's lstat
        // (mtime, ctime) sees the change.
        for (size_t size : {size_t(4096), size_t((9 << 20) + 5)}) {
            CAPTURE(size);
            test::TempDir t;
            test::write_file(t / "p/f", std::string(size, 'a'));
            util::Fd root = util::open_dir(t.path());
            auto item = first_file(root.get(), "p");
            ::usleep(20000); // a later timestamp tick than the walk's
            int fd = ::open((t / "p/f").c_str(), O_WRONLY);
            REQUIRE(fd >= 0);
            REQUIRE(::pwrite(fd, "b", 1, static_cast<off_t>(size / 2)) == 1);
            ::close(fd);
            try {
                ingest::hash_file(item);
                FAIL("a same-size edit went unnoticed");
            } catch (const walk::PackageError& e) {
                CHECK(std::string(e.what()).find("changed") != std::string::npos);
            }
        }
    }
}
