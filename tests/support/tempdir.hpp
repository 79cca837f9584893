// Test support: a fresh temporary directory per test, kept when the test fails.
#pragma once
#include <doctest/doctest.h>
#include <boost/filesystem.hpp>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

#include "casmig/util/fd.hpp"

namespace casmig::test {

/// Set by the listener in tests/main.cpp when an assertion of the running test case fails.
extern bool g_current_test_failed;

class TempDir {
public:
    // Fixtures use Boost.Filesystem (the declared stack; unique_path has no std:: equivalent); the code
    // under test does its own fd-relative I/O (docs/design.md says why).
    TempDir() {
        namespace bfs = boost::filesystem;
        for (int attempt = 0;; ++attempt) {
            bfs::path p = bfs::temp_directory_path() / bfs::unique_path("casmig-test-%%%%-%%%%-%%%%");
            if (bfs::create_directory(p)) {
                bfs::permissions(p, bfs::owner_all);
                m_path = p.string();
                return;
            }
            REQUIRE(attempt < 100);
        }
    }
    ~TempDir() {
        // A failed test keeps its directory for a look; a passing one cleans up.
        if (!g_current_test_failed && !std::getenv("CASMIG_KEEP_TEST_DIRS")) {
            util::Fd fd = util::open_dir("/");
            try {
                util::remove_tree_at(fd.get(), m_path.substr(1), m_path);
            } catch (...) {
                // best effort: a leftover test directory is harmless
            }
        } else {
            std::fprintf(stderr, "kept test directory %s\n", m_path.c_str());
        }
    }
    const std::string& path() const { return m_path; }
    std::string operator/(const std::string& rel) const { return m_path + "/" + rel; }

private:
    std::string m_path;
};

/// Writes a file (creating parent directories) with the given mode.
inline void write_file(const std::string& path, const std::string& data, mode_t mode = 0644) {
    boost::filesystem::create_directories(boost::filesystem::path(path).parent_path());
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    util::write_all(fd, data.data(), data.size(), path);
    ::fchmod(fd, mode);
    ::close(fd);
}

inline std::string read_file(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return "<missing>";
    std::string out;
    char buf[65536];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
    ::close(fd);
    return out;
}

} // namespace casmig::test
