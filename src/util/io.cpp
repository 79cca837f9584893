#include "casmig/util/io.hpp"

#include "casmig/util/fd.hpp"

#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef CASMIG_TEST_SEAMS
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <spawn.h>
#include <string>
#include <sys/wait.h>
#include <utility>
#include <vector>
#endif

namespace casmig::io {

#ifndef CASMIG_TEST_SEAMS

bool seams_enabled() noexcept { return false; }
void crash_point(const char*) noexcept {}
ssize_t write(int fd, const void* buf, size_t len) noexcept { return ::write(fd, buf, len); }
ssize_t pwrite(int fd, const void* buf, size_t len, off_t off) noexcept { return ::pwrite(fd, buf, len, off); }
int fsync(int fd) noexcept { return ::fsync(fd); }
int syncfs(int fd) noexcept { return ::syncfs(fd); }
int renameat2(int a, const char* b, int c, const char* d, unsigned f) noexcept { return ::renameat2(a, b, c, d, f); }
int linkat(int a, const char* b, int c, const char* d, int f) noexcept { return ::linkat(a, b, c, d, f); }
int unlinkat(int a, const char* b, int f) noexcept { return ::unlinkat(a, b, f); }
int mkdirat(int a, const char* b, mode_t m) noexcept { return ::mkdirat(a, b, m); }
int openat_create(int a, const char* b, int f, mode_t m) noexcept { return ::openat(a, b, f, m); }
int open_tmpfile(int a, int f, mode_t m) noexcept { return ::openat(a, ".", O_TMPFILE | f, m); }
ssize_t copy_file_range(int in, int out, size_t len) noexcept { return ::copy_file_range(in, nullptr, out, nullptr, len, 0); }
void note_written(int) noexcept {}

#else

namespace {

enum Op { op_write, op_fsync, op_syncfs, op_rename, op_link, op_unlink, op_mkdir, op_open, op_copy, op_count };
const char* const k_op_names[op_count] = {"write", "fsync", "syncfs", "rename", "link", "unlink", "mkdir", "open", "copy"};

enum class CrashMode { kill, power_data, power_names };

struct Fault {
    Op op;
    unsigned long n;
    bool sticky;
    int err;
};

struct NameOp {
    enum Kind { rename, link, mkdir } kind;
    std::string parent, from, to; // parent: directory that holds `to`
    // rename over an existing small regular file: its bytes and mode, put back by the undo (a power cut
    // before the directory is synced leaves the old file, not no file)
    bool replaced = false;
    std::string old_data;
    mode_t old_mode = 0;
};

struct State {
    std::string crash_name;
    unsigned long crash_n = 1;
    CrashMode mode = CrashMode::kill;
    std::string trace;
    std::string fault_trace; // CASMIG_FAULT_TRACE: at exit, "OP CALLS" per op (tests find the Nth call)
    std::vector<std::string> roots; // CASMIG_CRASH_ROOT: where power-data looks for unsynced files
    std::vector<Fault> faults;
    std::atomic<unsigned long> calls[op_count] = {};
    std::mutex mutex;
    std::map<std::string, unsigned long> hits;
    bool tracking = false;
    // CASMIG_HOOK_AT=<point>[@n]: the n-th time the point is reached, CASMIG_HOOK_CMD runs (sh -c) and
    // the command goes on: a test changes the world at an exact moment (a file changing under us).
    std::string hook_name, hook_cmd;
    unsigned long hook_n = 1, hook_hits = 0;
    std::set<std::pair<dev_t, ino_t>> dirty;
    std::vector<NameOp> names;

    /// "<point>[@N]" from the environment variable var (N defaults to 1); false when unset or empty.
    static bool point_from_env(const char* var, std::string& name, unsigned long& n) {
        const char* v = std::getenv(var);
        if (!v || !*v) return false;
        name = v;
        if (auto at = name.find('@'); at != std::string::npos) {
            n = std::strtoul(name.c_str() + at + 1, nullptr, 10);
            name.resize(at);
            if (n == 0) n = 1;
        }
        return true;
    }

    State() {
        point_from_env("CASMIG_CRASH_AT", crash_name, crash_n);
        if (const char* m = std::getenv("CASMIG_CRASH_MODE")) {
            std::string s = m;
            if (s == "power-data") mode = CrashMode::power_data;
            else if (s == "power-names") mode = CrashMode::power_names;
        }
        tracking = !crash_name.empty() && mode != CrashMode::kill;
        if (const char* t = std::getenv("CASMIG_CRASH_TRACE")) trace = t;
        if (const char* r = std::getenv("CASMIG_CRASH_ROOT")) {
            std::string s = r;
            size_t start = 0;
            while (start <= s.size()) {
                size_t end = s.find(':', start);
                if (end == std::string::npos) end = s.size();
                if (end > start) roots.push_back(s.substr(start, end - start));
                start = end + 1;
            }
        }
        if (const char* f = std::getenv("CASMIG_FAULT")) parse_faults(f);
        if (const char* t = std::getenv("CASMIG_FAULT_TRACE")) fault_trace = t;
        if (point_from_env("CASMIG_HOOK_AT", hook_name, hook_n))
            if (const char* c = std::getenv("CASMIG_HOOK_CMD")) hook_cmd = c;
    }

    ~State() {
        if (fault_trace.empty()) return;
        if (FILE* f = std::fopen(fault_trace.c_str(), "a")) {
            for (int i = 0; i < op_count; ++i) std::fprintf(f, "%s %lu\n", k_op_names[i], calls[i].load());
            std::fclose(f);
        }
    }

    void parse_faults(std::string spec) {
        size_t start = 0;
        while (start < spec.size()) {
            size_t end = spec.find(',', start);
            if (end == std::string::npos) end = spec.size();
            std::string one = spec.substr(start, end - start);
            start = end + 1;
            auto at = one.find('@'), eq = one.find('=');
            if (at == std::string::npos || eq == std::string::npos || eq < at) continue;
            std::string op = one.substr(0, at), count = one.substr(at + 1, eq - at - 1), err = one.substr(eq + 1);
            Fault f{op_count, 0, false, EIO};
            for (int i = 0; i < op_count; ++i)
                if (op == k_op_names[i]) f.op = static_cast<Op>(i);
            if (f.op == op_count) continue;
            if (!count.empty() && count.back() == '+') {
                f.sticky = true;
                count.pop_back();
            }
            f.n = std::strtoul(count.c_str(), nullptr, 10);
            if (err == "ENOSPC") f.err = ENOSPC;
            else if (err == "EIO") f.err = EIO;
            else if (err == "EACCES") f.err = EACCES;
            else if (err == "EDQUOT") f.err = EDQUOT;
            else if (err == "EROFS") f.err = EROFS;
            else if (err == "EPERM") f.err = EPERM;
            else if (err == "ENOENT") f.err = ENOENT; // the name went away since it was looked at
            faults.push_back(f);
        }
    }

    /// 0, or the errno the Nth call of op must fail with.
    int fault(Op op) {
        unsigned long n = ++calls[op];
        for (const auto& f : faults)
            if (f.op == op && (n == f.n || (f.sticky && n > f.n))) return f.err;
        return 0;
    }
};

State& state() {
    static State s;
    return s;
}

std::string fd_path(int fd) {
    if (fd == AT_FDCWD) {
        char buf[4096];
        return ::getcwd(buf, sizeof buf) ? std::string(buf) : std::string(".");
    }
    char link[64], buf[4096];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = ::readlink(link, buf, sizeof buf - 1);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

std::string join(int dirfd, const char* name) {
    if (name[0] == '/') return name;
    return fd_path(dirfd) + "/" + name;
}

std::string parent_of(const std::string& p) {
    auto pos = p.rfind('/');
    return pos == std::string::npos ? std::string(".") : p.substr(0, pos);
}

void mark_dirty(int fd) {
    State& s = state();
    if (!s.tracking || s.mode != CrashMode::power_data) return;
    struct stat st {};
    if (::fstat(fd, &st) != 0) return;
    std::lock_guard lk(s.mutex);
    s.dirty.insert({st.st_dev, st.st_ino});
}

void record_name(NameOp::Kind kind, int fromdir, const char* from, int todir, const char* to) {
    State& s = state();
    if (!s.tracking || s.mode != CrashMode::power_names) return;
    NameOp op{kind, {}, from ? join(fromdir, from) : std::string(), join(todir, to), false, {}, 0};
    op.parent = parent_of(op.to);
    std::lock_guard lk(s.mutex);
    s.names.push_back(std::move(op));
}

/// The names in the directory at `path` (util::list_dir), or none if it cannot be read: a simulated
/// power cut does what it can and never stops half-way.
std::vector<std::string> names_in(const std::string& path) {
    util::Fd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) return {};
    try {
        return util::list_dir(fd.get(), path);
    } catch (const util::Error&) {
        return {};
    }
}

void remove_tree(const std::string& path) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        ::chmod(path.c_str(), 0700);
        for (const auto& n : names_in(path)) remove_tree(path + "/" + n);
        ::rmdir(path.c_str());
    } else {
        ::unlink(path.c_str());
    }
}

void truncate_dirty(const std::string& path, const std::set<std::pair<dev_t, ino_t>>& dirty) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return;
    if (S_ISREG(st.st_mode) && dirty.count({st.st_dev, st.st_ino})) {
        ::chmod(path.c_str(), (st.st_mode & 07777) | 0200);
        ::truncate(path.c_str(), 0);
        ::chmod(path.c_str(), st.st_mode & 07777);
        return;
    }
    if (!S_ISDIR(st.st_mode)) return;
    for (const auto& n : names_in(path)) truncate_dirty(path + "/" + n, dirty);
}

void make_parents(const std::string& path) {
    for (size_t pos = path.find('/', 1); pos != std::string::npos; pos = path.find('/', pos + 1))
        ::mkdir(path.substr(0, pos).c_str(), 0700);
}

[[noreturn]] void crash_now() {
    State& s = state();
    {
        std::lock_guard lk(s.mutex);
        if (s.mode == CrashMode::power_data) {
            for (const auto& r : s.roots) truncate_dirty(r, s.dirty);
        } else if (s.mode == CrashMode::power_names) {
            for (auto it = s.names.rbegin(); it != s.names.rend(); ++it) {
                switch (it->kind) {
                case NameOp::rename:
                    // The source directory may be gone since (temp/ subdirectories are removed once
                    // empty): its removal was not synced either, so it comes back too.
                    if (::rename(it->to.c_str(), it->from.c_str()) != 0 && errno == ENOENT) {
                        make_parents(it->from);
                        ::rename(it->to.c_str(), it->from.c_str());
                    }
                    if (it->replaced) {
                        int fd = ::open(it->to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, it->old_mode);
                        if (fd >= 0) {
                            if (::write(fd, it->old_data.data(), it->old_data.size()) < 0) { /* best effort */ }
                            ::close(fd);
                        }
                    }
                    break;
                case NameOp::link: ::unlink(it->to.c_str()); break;
                case NameOp::mkdir: remove_tree(it->to); break;
                }
            }
        }
    }
    ::kill(::getpid(), SIGKILL);
    ::_exit(137);
}

/// Runs cmd with sh -c and waits for it; its exit status, or -1. Not std::system(): that ignores
/// SIGINT and SIGQUIT in the whole process while the command runs, so a hook that signals casmig
/// (`kill -INT $PPID`, tests of the stop at a safe point) would be lost.
int run_hook(const std::string& cmd) noexcept {
    const char* argv[] = {"sh", "-c", cmd.c_str(), nullptr};
    pid_t pid = 0;
    if (::posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char* const*>(argv), environ) != 0) return -1;
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

template <class F>
auto with_fault(Op op, F&& call) -> decltype(call()) {
    if (int e = state().fault(op)) {
        errno = e;
        return -1;
    }
    return call();
}

} // namespace

bool seams_enabled() noexcept { return true; }

void crash_point(const char* name) noexcept {
    State& s = state();
    if (!s.trace.empty()) {
        if (FILE* f = std::fopen(s.trace.c_str(), "a")) {
            std::fprintf(f, "%s\n", name);
            std::fclose(f);
        }
    }
    if (!s.hook_name.empty() && s.hook_name == name) {
        bool run;
        {
            std::lock_guard lk(s.mutex);
            run = ++s.hook_hits == s.hook_n;
        }
        if (run && !s.hook_cmd.empty() && run_hook(s.hook_cmd) != 0)
            std::fprintf(stderr, "casmig: test hook at %s: '%s' failed\n", name, s.hook_cmd.c_str());
    }
    if (s.crash_name.empty() || s.crash_name != name) return;
    unsigned long n;
    {
        std::lock_guard lk(s.mutex);
        n = ++s.hits[name];
    }
    if (n == s.crash_n) crash_now();
}

ssize_t write(int fd, const void* buf, size_t len) noexcept {
    ssize_t n = with_fault(op_write, [&] { return ::write(fd, buf, len); });
    if (n > 0) mark_dirty(fd);
    return n;
}

ssize_t pwrite(int fd, const void* buf, size_t len, off_t off) noexcept {
    ssize_t n = with_fault(op_write, [&] { return ::pwrite(fd, buf, len, off); });
    if (n > 0) mark_dirty(fd);
    return n;
}

int fsync(int fd) noexcept {
    int rc = with_fault(op_fsync, [&] { return ::fsync(fd); });
    State& s = state();
    if (rc == 0 && s.tracking) {
        struct stat st {};
        if (::fstat(fd, &st) == 0) {
            std::string me = S_ISDIR(st.st_mode) ? fd_path(fd) : std::string();
            std::lock_guard lk(s.mutex);
            s.dirty.erase({st.st_dev, st.st_ino});
            if (!me.empty())
                std::erase_if(s.names, [&](const NameOp& o) { return o.parent == me; });
        }
    }
    return rc;
}

int syncfs(int fd) noexcept {
    int rc = with_fault(op_syncfs, [&] { return ::syncfs(fd); });
    State& s = state();
    if (rc == 0 && s.tracking) {
        std::lock_guard lk(s.mutex);
        s.dirty.clear();
        s.names.clear();
    }
    return rc;
}

int renameat2(int a, const char* b, int c, const char* d, unsigned f) noexcept {
    std::string from = state().tracking ? join(a, b) : std::string();
    NameOp op{NameOp::rename, {}, from, {}, false, {}, 0};
    if (state().tracking && state().mode == CrashMode::power_names && !(f & (RENAME_NOREPLACE | RENAME_EXCHANGE))) {
        struct stat st {};
        if (::fstatat(c, d, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_size <= (1 << 20)) {
            int fd = ::openat(c, d, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
            if (fd >= 0) {
                op.old_data.resize(static_cast<size_t>(st.st_size));
                ssize_t n = ::read(fd, op.old_data.data(), op.old_data.size());
                op.replaced = n == st.st_size;
                op.old_mode = st.st_mode & 07777;
                ::close(fd);
            }
        }
    }
    int rc = with_fault(op_rename, [&] { return ::renameat2(a, b, c, d, f); });
    if (rc == 0 && state().tracking) {
        State& s = state();
        if (s.mode == CrashMode::power_names) {
            op.to = join(c, d);
            op.parent = parent_of(op.to);
            std::lock_guard lk(s.mutex);
            s.names.push_back(std::move(op));
        }
    }
    return rc;
}

int linkat(int a, const char* b, int c, const char* d, int f) noexcept {
    int rc = with_fault(op_link, [&] { return ::linkat(a, b, c, d, f); });
    if (rc == 0) record_name(NameOp::link, a, b, c, d);
    return rc;
}

int unlinkat(int a, const char* b, int f) noexcept { return with_fault(op_unlink, [&] { return ::unlinkat(a, b, f); }); }

int mkdirat(int a, const char* b, mode_t m) noexcept {
    int rc = with_fault(op_mkdir, [&] { return ::mkdirat(a, b, m); });
    if (rc == 0) record_name(NameOp::mkdir, a, nullptr, a, b);
    return rc;
}

int openat_create(int a, const char* b, int f, mode_t m) noexcept {
    int fd = with_fault(op_open, [&] { return ::openat(a, b, f, m); });
    if (fd >= 0) record_name(NameOp::link, a, nullptr, a, b); // a new name: lost if its directory is not synced
    return fd;
}

int open_tmpfile(int a, int f, mode_t m) noexcept {
    return with_fault(op_open, [&] { return ::openat(a, ".", O_TMPFILE | f, m); });
}

ssize_t copy_file_range(int in, int out, size_t len) noexcept {
    ssize_t n = with_fault(op_copy, [&] { return ::copy_file_range(in, nullptr, out, nullptr, len, 0); });
    if (n > 0) mark_dirty(out);
    return n;
}

void note_written(int fd) noexcept { mark_dirty(fd); }

#endif

} // namespace casmig::io
