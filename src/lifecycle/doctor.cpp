// lifecycle::doctor — the store's health in one read-only pass (issue 10, item 7): what an admin or a
// monitoring check needs to know before it becomes a lost night. Writes nothing, takes no lock and
// never probes one with flock (a probe could make a concurrent command's non-blocking lock fail):
// lock holders are read from /proc/locks.
#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/cas/object_store.hpp"
#include "casmig/catalog/sqlite.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/walk/walker.hpp"

#include <cerrno>
#include <fcntl.h>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

namespace casmig::lifecycle {

namespace {

/// pid of a process holding an flock on the file at path (from /proc/locks), or 0 when none does.
long flock_holder(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return 0;
    char want[64];
    std::snprintf(want, sizeof want, "%02x:%02x:%llu", major(st.st_dev), minor(st.st_dev),
                  static_cast<unsigned long long>(st.st_ino));
    std::ifstream in("/proc/locks");
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        std::string id, kind, mode, access, pid, dev;
        ls >> id >> kind;
        if (kind == "->") ls >> kind; // a waiter: "1: -> FLOCK ..."
        ls >> mode >> access >> pid >> dev;
        if (kind == "FLOCK" && dev == want) return std::strtol(pid.c_str(), nullptr, 10);
    }
    return 0;
}

std::string first_line_of(const std::string& path) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    return line;
}

std::uint64_t tree_bytes(int store_fd, const std::string& name) {
    std::uint64_t n = 0;
    try {
        walk::PackageWalker w(store_fd, name);
        walk::Item it;
        for (;;) {
            try {
                if (!w.next(it)) break;
            } catch (const walk::PackageError&) {
                continue; // migrate names it; doctor only estimates space
            }
            if (it.entry.type == catalog::EntryType::file) n += static_cast<std::uint64_t>(it.st.st_blocks) * 512;
        }
    } catch (const walk::PackageError&) {
    }
    return n;
}

} // namespace

DoctorReport doctor(store::Store& s, const DoctorOptions& opts) {
    DoctorReport r;
    auto add = [&](Severity sev, std::string check, std::string message) {
        r.findings.push_back({sev, std::move(check), std::move(message)});
    };
    // 1. The catalog: it fits its store, and SQLite's quick_check passes.
    std::optional<StatusReport> st;
    try {
        st = status(s, 200);
    } catch (const util::RefusedError& e) {
        add(Severity::critical, "catalog", e.what()); // names the way back already
    } catch (const util::Error& e) {
        add(Severity::critical, "catalog",
            std::string(e.what()) + ": the catalog cannot be read: stop migrating; restore a current backup of it or "
                                    "run casmig rebuild-catalog");
    }
    if (st && s.has_catalog()) {
        try {
            catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
            catalog::Stmt q(cat.db(), "PRAGMA quick_check");
            std::string first = q.step() ? q.str(0) : std::string("no answer");
            if (first != "ok")
                add(Severity::critical, "catalog",
                    "catalog " + s.db_path() + " fails SQLite's quick_check (" + first +
                        "): stop migrating; restore a current backup of it or run casmig rebuild-catalog");
        } catch (const util::Error& e) {
            add(Severity::critical, "catalog", std::string("cannot check the catalog: ") + e.what());
        }
    }
    if (st) {
        r.mode = st->mode;
        // 2. Failures: more than 5% of migrations failing is the strategy's rollback trigger.
        const std::uint64_t failed = st->states["failed"];
        const std::uint64_t tried = failed + st->states["migrated"] + st->states["verified"];
        if (failed) {
            const double pct = tried ? 100.0 * static_cast<double>(failed) / static_cast<double>(tried) : 0;
            char b[32];
            std::snprintf(b, sizeof b, "%.1f%%", pct);
            // A failed package's error is already a line naming it ("package ID: path: what").
            std::string first = st->failures.empty() ? ""
                                : st->failures.front().second.empty() ? " (first: " + st->failures.front().first + ")"
                                                                      : " (first: " + st->failures.front().second + ")";
            if (pct > opts.max_failure_percent)
                add(Severity::critical, "failures",
                    std::to_string(failed) + " of " + std::to_string(tried) + " migrations failed (" + b + ", over " +
                        std::to_string(static_cast<int>(opts.max_failure_percent)) + "%)" + first +
                        ": stop the nightly batches, fix the cause (casmig list --state failed), consider casmig rollback");
            else
                add(Severity::warning, "failures",
                    std::to_string(failed) + " package(s) failed" + first +
                        ": fix each (casmig list --state failed), then casmig migrate --retry-failed");
        }
        // 3. Speed: pending work and no migrate progress recently.
        const std::uint64_t pending = st->states["pending"] + st->states["rolled_back"] + st->states["in_progress"];
        if (pending && st->mode != "legacy") {
            std::int64_t last = 0;
            for (const auto& j : st->journal)
                if (j.command == "migrate" && j.to == "migrated") last = std::max(last, j.at_ns);
            const auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::chrono::system_clock::now().time_since_epoch()).count();
            const double hours = last ? static_cast<double>(now - last) / 3.6e12 : -1;
            if (hours > opts.stall_hours)
                add(Severity::warning, "speed",
                    std::to_string(pending) + " package(s) pending and none migrated for " +
                        std::to_string(static_cast<long>(hours)) + " h: check that casmig-migrate.timer runs "
                        "(systemctl list-timers) and its journal (journalctl -u casmig-migrate)");
            // The last run's pace: a run long enough to say something, too slow for what is left.
            const auto& lr = st->last_migrate;
            const double run_s = lr.found ? static_cast<double>(lr.ended_ns - lr.started_ns) / 1e9 : 0;
            if (run_s >= opts.min_run_seconds) {
                const double per_hour = static_cast<double>(lr.migrated) / (run_s / 3600.0);
                if (per_hour < opts.min_packages_per_hour) {
                    char b[160];
                    std::snprintf(b, sizeof b, "the last migrate run did %.0f packages per hour (%llu in %.0f min, under %.0f/h), "
                                  "%llu pending", per_hour, (unsigned long long)lr.migrated, run_s / 60,
                                  opts.min_packages_per_hour, (unsigned long long)pending);
                    add(Severity::warning, "speed",
                        std::string(b) + ": check its --io-limit and --time-budget, the disk (iostat) and what else "
                                         "runs at that hour (journalctl -u casmig-migrate)");
                }
            }
        }
    }
    // 4. Integrity: verified packages whose verify after cutover failed, and objects quarantined by
    // verify, cleanup or migrate.
    if (st && !st->verify_failures.empty()) {
        const auto& f = st->verify_failures.front();
        add(Severity::critical, "integrity",
            std::to_string(st->verify_failures.size()) + " verified package(s) failed verify after cutover (first: " +
                f.error + "): restore what is damaged (docs/operations.md, \"A package fails verify after cutover\"), "
                "then casmig verify PKG; casmig list --verify-failed names them all");
    }
    {
        const std::string corrupt = s.migration_dir() + "/corrupt";
        std::vector<std::string> names;
        try {
            util::Fd d(::open(corrupt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
            if (d) names = util::list_dir(d.get(), corrupt);
        } catch (const util::Error&) {
        }
        if (!names.empty())
            add(Severity::critical, "integrity",
                std::to_string(names.size()) + " damaged file(s) kept in " + corrupt +
                    " (objects that did not match their names): run casmig verify --objects and read its report; "
                    "once no package is failed or fails verify (casmig list --state failed, casmig list --verify-failed), "
                    "delete them (they are evidence, never read again)");
    }
    // 5. Space: the pending packages' legacy bytes must fit (migrate writes at most that much).
    {
        struct statvfs vfs {};
        if (::statvfs(s.root().c_str(), &vfs) == 0) {
            const std::uint64_t free_bytes = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
            std::uint64_t need = 0;
            std::set<std::string> done;
            if (st && s.has_catalog()) {
                catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
                for (const auto& p : cat.packages())
                    if (p.state != catalog::PackageState::verified && p.tree == catalog::TreeState::present)
                        need += tree_bytes(s.root_fd(), p.name);
                    else
                        done.insert(p.name);
            }
            for (const auto& n : s.legacy_dirs())
                if (!done.count(n) && (!st || !s.has_catalog())) need += tree_bytes(s.root_fd(), n);
            r.free_bytes = free_bytes;
            r.pending_bytes = need;
            if (need > free_bytes)
                add(Severity::critical, "space",
                    "the pending packages take " + util::human_bytes(static_cast<double>(need)) + " and " + s.root() +
                        " has " + util::human_bytes(static_cast<double>(free_bytes)) +
                        " free: migrate fits only part (casmig plan says exactly how much); free space first");
            else if (need > free_bytes / 10 * 8)
                add(Severity::warning, "space",
                    "the pending packages take " + util::human_bytes(static_cast<double>(need)) + ", over 80% of the " +
                        util::human_bytes(static_cast<double>(free_bytes)) + " free in " + s.root() +
                        ": run casmig plan for the exact need");
        }
    }
    // 6. temp/: not casmig's directory (every command that takes the lock refuses), staging
    // directories of dead processes, foreign entries, leftovers of stopped commands.
    {
        struct stat st {};
        if (::fstatat(s.root_fd(), "temp", &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(st.st_mode))
            add(Severity::critical, "temp",
                s.temp_dir() + " is " + (S_ISLNK(st.st_mode) ? "a symlink" : "not a directory") +
                    ": every command that writes refuses (exit 3); move it out of the way (mv " + s.temp_dir() + " " +
                    s.temp_dir() + ".old)");
    }
    {
        const std::string temp = s.temp_dir();
        std::vector<std::string> names;
        try {
            util::Fd d(::open(temp.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
            if (d) names = util::list_dir(d.get(), temp);
        } catch (const util::Error&) {
        }
        std::uint64_t stale = 0, foreign = 0, leftover = 0;
        for (const auto& n : names) {
            if (n.rfind("trash-", 0) == 0 || n.rfind("rollback-", 0) == 0) {
                ++leftover;
            } else if (n.rfind(cas::k_temp_dir_marker, 0) == 0) {
                if (!flock_holder(temp + "/" + n + "/" + cas::k_temp_lock_name)) ++stale;
            } else {
                ++foreign;
            }
        }
        if (stale || leftover)
            add(Severity::warning, "temp",
                std::to_string(stale + leftover) + " entr" + (stale + leftover == 1 ? "y" : "ies") + " in " + temp +
                    " left by stopped commands: the next command that takes the lock (e.g. casmig verify) finishes or "
                    "removes them");
        if (foreign)
            add(Severity::warning, "temp",
                std::to_string(foreign) + " entr" + (foreign == 1 ? "y" : "ies") + " in " + temp +
                    " that casmig did not make: move them out of the store");
    }
    // 7. The lock: who holds it (no finding by itself: a run in progress is normal).
    {
        const std::string lock = s.migration_dir() + "/lock";
        if (long pid = flock_holder(lock)) {
            r.lock_holder = lock_holder(s);
            // How long it has run: /proc/<pid>/stat field 22 (start, clock ticks after boot).
            std::string stat = first_line_of("/proc/" + std::to_string(pid) + "/stat");
            std::istringstream up(first_line_of("/proc/uptime"));
            double uptime = 0;
            up >> uptime;
            if (auto close = stat.rfind(')'); close != std::string::npos && uptime > 0) {
                std::istringstream fs(stat.substr(close + 2));
                std::string f;
                for (int i = 3; i <= 22 && fs >> f; ++i) {
                }
                const double started = std::strtod(f.c_str(), nullptr) / static_cast<double>(::sysconf(_SC_CLK_TCK));
                const double hours = (uptime - started) / 3600;
                if (hours > opts.stall_hours)
                    add(Severity::warning, "lock",
                        "the store lock has been held for " + std::to_string(static_cast<long>(hours)) + " h by " +
                            r.lock_holder + ": if that run is hung (casmig status shows no journal progress), stop it "
                            "(kill -TERM " + std::to_string(pid) + "; every command is crash-safe)");
            }
        }
    }
    r.healthy = r.findings.empty();
    return r;
}

std::string lock_holder(store::Store& s) {
    const std::string lock = s.migration_dir() + "/lock";
    long pid = flock_holder(lock);
    if (!pid) return {};
    std::string text = first_line_of(lock);
    return text.empty() ? "pid " + std::to_string(pid) : text;
}

const char* to_string(Severity s) { return s == Severity::critical ? "critical" : "warning"; }

} // namespace casmig::lifecycle
