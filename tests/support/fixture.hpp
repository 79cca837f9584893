// Test support: small legacy stores.
#pragma once
#include "tempdir.hpp"

#include <sys/stat.h>

namespace casmig::test {

/// Three packages sharing a file, with a symlink, an executable, an empty file and an empty dir.
inline void make_small_store(const std::string& root) {
    for (int i = 0; i < 3; ++i) {
        std::string p = root + "/pkg" + std::to_string(i);
        write_file(p + "/LICENSE", "shared license text\n");
        write_file(p + "/bin/tool", "#!/bin/sh\necho tool " + std::to_string(i) + "\n", 0755);
        write_file(p + "/share/empty", "");
        ::mkdir((p + "/share/empty-dir").c_str(), 0755);
        ::symlink("tool", (p + "/bin/alias").c_str());
    }
}

} // namespace casmig::test
