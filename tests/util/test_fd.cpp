#include <doctest/doctest.h>

#include "../support/tempdir.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

#include <sys/stat.h>

using namespace casmig;

TEST_SUITE("util::Fd") {
    TEST_CASE("remove_tree_at removes read-only directories and never follows symlinks") {
        test::TempDir t;
        test::write_file(t / "victim/keep", "outside");
        test::write_file(t / "tree/ro/file", "12345");
        ::symlink((t / "victim").c_str(), (t / "tree/link").c_str());
        ::chmod((t / "tree/ro").c_str(), 0555);
        util::Fd root = util::open_dir(t.path());
        auto bytes = util::remove_tree_at(root.get(), "tree", t / "tree");
        CHECK(bytes == 5);
        struct stat st {};
        CHECK(::lstat((t / "tree").c_str(), &st) != 0);
        CHECK(test::read_file(t / "victim/keep") == "outside");
    }
    TEST_CASE("list_dir lists twice from the same fd") {
        test::TempDir t;
        test::write_file(t / "a", "");
        test::write_file(t / "b", "");
        util::Fd fd = util::open_dir(t.path());
        CHECK(util::list_dir(fd.get(), t.path()).size() == 2);
        CHECK(util::list_dir(fd.get(), t.path()).size() == 2);
    }
}
