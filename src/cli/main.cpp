// casmig — command line. Parses with CLI11, prints with nlohmann::json, maps errors to exit codes:
// 0 success; 1 finished but something failed; 2 usage error or unusable input; 3 refused (store
// unchanged); 4 store busy; 128 + signal (130, 143) stopped by SIGINT/SIGTERM at a safe point.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <ctime>
#include <optional>
#include <set>
#include <unistd.h>

#include "casmig/catalog/catalog.hpp"
#include "casmig/hash/blake3.hpp"
#include "casmig/lifecycle/lifecycle.hpp"
#include "casmig/migrate/convert.hpp"
#include "casmig/migrate/pipeline.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/store/store.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/util/suggest.hpp"
#include "casmig/verify/verify.hpp"
#include "progress.hpp"

using json = nlohmann::json;
using namespace casmig;

namespace {

enum Exit { k_ok = 0, k_failed = 1, k_usage = 2, k_refused = 3, k_busy = 4 };

struct Globals {
    std::string store, db, progress = "auto", metrics_file;
    unsigned jobs = 0;
    bool json = false, quiet = false, verbose = false;
    std::string lock_wait;               // --lock-wait DUR, as given
    std::chrono::milliseconds lock_wait_ms{0};
};

/// What the metrics file needs once main's command has returned (see main() at the end).
struct MetricsRun {
    std::string path, command, store, db;
    std::uint64_t problems_seen = 0;
} g_metrics;

struct Ctx {
    Globals& g;
    std::unique_ptr<store::Store> store;
    std::unique_ptr<cli::ProgressBar> bar;
    std::uint64_t problems = 0;

    explicit Ctx(Globals& globals) : g(globals) {
        std::string root = g.store;
        if (root.empty()) {
            const char* env = std::getenv("CASMIG_STORE");
            root = env && *env ? env : "/opt/pm/store";
        }
        store = std::make_unique<store::Store>(root, g.db);
        bool tty = ::isatty(STDERR_FILENO);
        bool on = g.progress == "always" || (g.progress == "auto" && tty && !g.quiet);
        bar = std::make_unique<cli::ProgressBar>(!on ? cli::ProgressBar::Style::off
                                                 : tty ? cli::ProgressBar::Style::redraw
                                                       : cli::ProgressBar::Style::log);
        store->set_warning_sink([this](const std::string& m) { bar->println("casmig: warning: " + m); });
        set_lock_wait();
    }
    /// --lock-wait: the store lock (and gc.lock) are waited for; one line says who holds it.
    void set_lock_wait() {
        store->set_lock_wait({g.lock_wait_ms, [this](const std::string& m) {
                                  if (!g.quiet) bar->println("casmig: " + m);
                              }});
    }
    /// The store lock, then recovery of whatever a stopped run left half done (lifecycle::recover).
    std::unique_ptr<store::StoreLock> lock(const std::string& command, store::Purpose purpose = store::Purpose::write) {
        // packages/ only mirrors the catalog: a failure to bring it up to date is a warning, never a
        // reason to stop the command (rollback included); the next command tries again.
        return lifecycle::lock_store(*store, command, purpose, problem_sink(),
                                     [this](const std::string& w) { bar->println("casmig: warning: " + w); });
    }
    ProgressSink progress() {
        return [this](const Progress& p) { bar->update(p); };
    }
    ProblemSink problem_sink() {
        return [this](const Problem& p) {
            if (g.json && reported.size() < k_max_reported)
                reported.push_back({{"package", p.package}, {"path", p.path}, {"message", p.message}, {"warning", p.warning}});
            if (p.warning) {
                bar->println("casmig: warning: " + p.line());
                return;
            }
            ++problems;
            bar->println("casmig: " + p.line());
        };
    }
    /// With --json, every problem and warning of the run goes into the document too ("problems"),
    /// as it also went to stderr; at most k_max_reported of them.
    static constexpr std::size_t k_max_reported = 10000;
    json reported = json::array();
    void out(const json& j, const std::string& human) {
        bar->finish();
        if (g.json) {
            json doc = j;
            if (doc.is_object()) doc["problems"] = reported;
            std::cout << doc.dump(2) << std::endl;
        } else if (!g.quiet && !human.empty()) {
            std::cout << human << std::flush;
        }
    }
};

std::string hb(std::uint64_t b) { return util::human_bytes(static_cast<double>(b)); }

// ------------------------------------------------------------------ signals

/// A signal within this long of the first is the same request delivered twice: `timeout`, for one,
/// signals the command and then its whole process group, and a cron job's `kill 0` does the same.
constexpr long long k_repeat_ns = 200'000'000;
std::atomic<long long> g_first_signal_ns{0};
static_assert(std::atomic<long long>::is_always_lock_free);

long long monotonic_ns() noexcept {
    struct timespec ts {};
    ::clock_gettime(CLOCK_MONOTONIC, &ts); // async-signal-safe
    return static_cast<long long>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

/// SIGINT or SIGTERM: the first records the request (util::request_stop, one atomic store); a second
/// one, at least k_repeat_ns later, stops the process at once (the default action, re-raised on
/// return from the handler); one sooner is the first delivered again and changes nothing.
/// Async-signal-safe; it never throws.
void on_stop_signal(int sig) {
    const int saved = errno;
    const long long now = monotonic_ns();
    long long first = 0;
    if (g_first_signal_ns.compare_exchange_strong(first, now)) {
        util::request_stop(sig);
    } else if (now - first >= k_repeat_ns) {
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        ::sigaction(SIGINT, &dfl, nullptr);
        ::sigaction(SIGTERM, &dfl, nullptr);
        ::raise(sig); // blocked while this handler runs: delivered, with the default action, on return
    }
    errno = saved;
}

/// For the commands with safe points (migrate, convert, verify, cleanup, rollback, add): SIGINT and
/// SIGTERM make them stop there — what is durable is committed, staged files are removed, one line
/// says what was done (interrupted()) — and a second signal stops at once (every command is
/// crash-safe). The other commands keep the default action; a signal the caller ignores (nohup) stays
/// ignored. The library installs no handler: the package manager owns its signals.
void stop_at_safe_points() {
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sa.sa_flags = SA_RESTART;
    for (int sig : {SIGINT, SIGTERM}) {
        struct sigaction old {};
        if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
        ::sigaction(sig, &sa, nullptr);
    }
}

/// A command stopped at a safe point by SIGINT/SIGTERM: `j` says so ("interrupted": "SIGTERM").
void note_interrupted(json& j) { j["interrupted"] = util::signal_name(util::stop_signal()); }

/// ... and one line on stderr says what was done and how to resume; exit 128 + signal (130, 143).
int interrupted(const std::string& what) {
    const int sig = util::stop_signal();
    std::fprintf(stderr, "casmig: interrupted (%s): %s\n", util::signal_name(sig).c_str(), what.c_str());
    return 128 + sig;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// ------------------------------------------------------------------ plan

int cmd_plan(Ctx& c, const migrate::Options& o) {
    c.store->check_catalog(store::Purpose::read, "plan");
    auto r = migrate::plan(*c.store, o, c.progress(), c.problem_sink());
    json j = {{"packages", r.packages}, {"files", r.files}, {"bytes", r.bytes}, {"unique_bytes", r.unique_bytes},
              {"unique_objects", r.unique_objects}, {"free_bytes", r.free_bytes}, {"needed_bytes", r.needed_bytes},
              {"failing_packages", r.failed}, {"enough_space", r.needed_bytes <= r.free_bytes},
              {"packages_that_fit", r.packages_that_fit}};
    std::string h = fmt("plan: %llu packages, %llu files, %s to read\n"
                        "      %llu new objects, %s of distinct new content (dedup saves %s)\n"
                        "      needs about %s, %s free%s\n",
                        (unsigned long long)r.packages, (unsigned long long)r.files, hb(r.bytes).c_str(),
                        (unsigned long long)r.unique_objects, hb(r.unique_bytes).c_str(),
                        hb(r.bytes > r.unique_bytes ? r.bytes - r.unique_bytes : 0).c_str(), hb(r.needed_bytes).c_str(),
                        hb(r.free_bytes).c_str(), r.needed_bytes > r.free_bytes ? "  NOT ENOUGH SPACE" : "");
    if (r.failed) h += fmt("      %llu package(s) would fail (see above)\n", (unsigned long long)r.failed);
    c.out(j, h);
    if (r.needed_bytes > r.free_bytes) {
        std::fprintf(stderr, "casmig: not enough space in %s: needs about %s, %s free; free space%s\n",
                     c.store->root().c_str(), hb(r.needed_bytes).c_str(), hb(r.free_bytes).c_str(),
                     r.packages_that_fit ? fmt(" or migrate fewer packages (--limit %llu fits)",
                                               (unsigned long long)r.packages_that_fit).c_str() : "");
        return k_refused;
    }
    return r.failed ? k_failed : k_ok;
}

// ------------------------------------------------------------------ migrate

int cmd_migrate(Ctx& c, const migrate::Options& o) {
    auto lock = c.lock("migrate");
    auto r = migrate::migrate(*c.store, o, c.progress(), c.problem_sink());
    json j = {{"packages", r.packages}, {"migrated", r.migrated}, {"verified", r.verified}, {"failed", r.failed},
              {"files", r.files}, {"bytes", r.bytes}, {"new_objects", r.new_objects},
              {"new_object_bytes", r.new_object_bytes}, {"stopped_by_time_budget", r.stopped_by_budget},
              {"disk_full", r.disk_full}, {"not_started", r.not_started},
              {"failed_not_retried", r.failed_not_retried}, {"seconds", r.seconds},
              {"verify_files_read", r.verify_files_read}, {"verify_files_by_identity", r.verify_files_by_identity}};
    std::string h = fmt("migrate: %llu packages (%llu migrated, %llu verified, %llu failed), %llu files, %s read, "
                        "%llu new objects (%s) in %.1fs%s",
                        (unsigned long long)r.packages, (unsigned long long)r.migrated, (unsigned long long)r.verified,
                        (unsigned long long)r.failed, (unsigned long long)r.files, hb(r.bytes).c_str(),
                        (unsigned long long)r.new_objects, hb(r.new_object_bytes).c_str(), r.seconds,
                        r.stopped_by_budget ? "; time budget reached, rerun to continue" : "");
    if (r.failed_not_retried)
        h += fmt("; %llu failed package(s) not retried (casmig list --state failed; fix them, then --retry-failed)",
                 (unsigned long long)r.failed_not_retried);
    h += "\n";
    if (r.interrupted) {
        note_interrupted(j);
        j["left"] = r.left;
        j["left_unverified"] = r.left_unverified;
    }
    c.out(j, h);
    // A full disk that left nothing undone (the packages went through one at a time) is a success.
    const bool left = r.disk_full && (r.not_started || r.unverified);
    if (left || (r.disk_full && !c.g.quiet))
        std::fprintf(stderr, "casmig: disk full in %s (%s): %llu packages migrated, %llu not started%s\n",
                     c.store->root().c_str(), r.disk_full_error.c_str(), (unsigned long long)r.migrated,
                     (unsigned long long)r.not_started,
                     !left ? "; nothing left to do" : r.not_started ? "; free space and rerun"
                                                   : "; some are not verified yet: free space and run casmig verify");
    if (r.interrupted)
        return interrupted(fmt("%llu packages migrated (%llu verified), %llu left pending%s; run casmig migrate to continue",
                               (unsigned long long)r.migrated, (unsigned long long)r.verified, (unsigned long long)r.left,
                               r.left_unverified ? fmt(", %llu migrated but not verified yet",
                                                       (unsigned long long)r.left_unverified).c_str() : ""));
    return r.failed || c.problems || left ? k_failed : k_ok;
}

// ------------------------------------------------------------------ convert

int cmd_convert(Ctx& c, const migrate::ConvertOptions& o) {
    auto lock = c.lock("convert");
    auto r = migrate::convert(*c.store, o, c.progress(), c.problem_sink());
    json j = {{"compression", r.compression}, {"objects", r.objects}, {"converted", r.converted},
              {"already", r.already}, {"kept_raw", r.kept_raw}, {"failed", r.failed},
              {"quarantined", r.quarantined}, {"bytes_before", r.bytes_before}, {"bytes_after", r.bytes_after},
              {"stopped_by_time_budget", r.stopped_by_budget}, {"seconds", r.seconds}};
    const bool zstd = o.target == migrate::Target::zstd;
    std::string h = fmt("convert: store is %s; %llu objects: %llu converted (%s -> %s), %llu already %s, ",
                        zstd ? ("zstd (" + r.compression + ")").c_str() : "raw", (unsigned long long)r.objects,
                        (unsigned long long)r.converted, hb(r.bytes_before).c_str(), hb(r.bytes_after).c_str(),
                        (unsigned long long)r.already, zstd ? "compressed" : "raw");
    if (zstd) h += fmt("%llu kept raw (not worth compressing), ", (unsigned long long)r.kept_raw);
    h += fmt("%llu failed%s in %.1fs%s\n", (unsigned long long)r.failed,
             r.failed ? " (listed above; they stay as they were)" : "", r.seconds,
             r.stopped_by_budget ? "; time budget reached, rerun to continue" : "");
    if (r.interrupted) note_interrupted(j);
    c.out(j, h);
    if (r.interrupted)
        return interrupted(fmt("%llu objects converted, %u of objects/'s 256 fan-out directories left; run casmig convert %s "
                               "to continue",
                               (unsigned long long)r.converted, r.shards_left, zstd ? "--compress" : "--raw"));
    return r.failed || c.problems ? k_failed : k_ok;
}

// ------------------------------------------------------------------ status

int cmd_status(Ctx& c, int journal_lines) {
    auto& s = *c.store;
    auto st = lifecycle::status(s, journal_lines);
    const auto& t = st.totals;
    const auto& mode = st.mode;
    const auto& compression = st.compression;
    const auto& failures = st.failures;
    const auto& journal = st.journal;
    const std::uint64_t total = st.total;
    auto& states = st.states;
    auto& trees = st.trees;
    std::int64_t saved = t.logical_bytes - t.stored_bytes;
    // object_bytes / stored_bytes, rounded to 3 decimals; 1 for an empty store
    double ratio = t.stored_bytes ? std::round(1000.0 * static_cast<double>(t.object_bytes) / static_cast<double>(t.stored_bytes)) / 1000.0
                                  : 1.0;
    json j = {{"mode", mode},
              {"packages", {{"total", total}}},
              {"legacy_trees", trees},
              {"files", t.files},
              {"objects", t.objects},
              {"logical_bytes", t.logical_bytes},
              {"stored_bytes", t.stored_bytes},
              {"saved_bytes", saved},
              // zstd store mode: what compression alone saved, on the distinct contents
              {"compression", compression},
              {"object_bytes", t.object_bytes},
              {"compressed_saved_bytes", t.object_bytes - t.stored_bytes},
              {"compression_ratio", ratio}};
    for (auto& [k, v] : states) j["packages"][k] = v;
    const auto& lr = st.last_migrate;
    auto iso = [](std::int64_t ns) {
        std::time_t secs = static_cast<std::time_t>(ns / 1'000'000'000);
        char b[32];
        std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&secs));
        return std::string(b);
    };
    const double run_secs = lr.found ? static_cast<double>(lr.ended_ns - lr.started_ns) / 1e9 : 0;
    if (lr.found)
        j["last_migrate"] = {{"started", iso(lr.started_ns)}, {"ended", iso(lr.ended_ns)}, {"by", lr.who},
                             {"result", lr.result.empty() ? json(nullptr) : json(lr.result)},
                             {"migrated", lr.migrated}, {"failed", lr.failed}, {"files", lr.files}, {"bytes", lr.bytes},
                             {"seconds", run_secs},
                             {"bytes_per_second", run_secs > 0 ? static_cast<double>(lr.bytes) / run_secs : 0.0}};
    else
        j["last_migrate"] = nullptr;
    j["lock_holder"] = st.lock_holder.empty() ? json(nullptr) : json(st.lock_holder);
    j["failures"] = json::array();
    for (const auto& [name, err] : failures) j["failures"].push_back({{"package", name}, {"error", err}});
    j["verify_failures"] = json::array();
    for (const auto& f : st.verify_failures)
        j["verify_failures"].push_back({{"package", f.package}, {"error", f.error}, {"at", iso(f.at_ns)}});
    j["eta_seconds"] = st.eta_seconds < 0 ? json(nullptr) : json(std::llround(st.eta_seconds));
    std::string h = fmt("store      %s\nmode       %s\n", s.root().c_str(), mode.c_str());
    h += fmt("packages   %llu total: %llu pending, %llu in progress, %llu migrated, %llu verified, %llu failed, "
             "%llu rolled back\n",
             (unsigned long long)total, (unsigned long long)states["pending"], (unsigned long long)states["in_progress"],
             (unsigned long long)states["migrated"], (unsigned long long)states["verified"],
             (unsigned long long)states["failed"], (unsigned long long)states["rolled_back"]);
    h += fmt("trees      %llu present, %llu marked for cleanup, %llu removed\n", (unsigned long long)trees["present"],
             (unsigned long long)trees["marked"], (unsigned long long)trees["removed"]);
    h += fmt("files      %lld in manifests, %s logical\n", (long long)t.files, hb(t.logical_bytes).c_str());
    h += fmt("objects    %lld, %s stored, %s saved (%.1f%%)\n", (long long)t.objects, hb(t.stored_bytes).c_str(),
             util::human_bytes(static_cast<double>(saved)).c_str(),
             t.logical_bytes ? 100.0 * static_cast<double>(saved) / static_cast<double>(t.logical_bytes) : 0.0);
    if (lr.found)
        h += fmt("last run   migrate %s .. %s (%s), %s: %llu migrated, %llu failed, %s in %.0f s%s\n",
                 iso(lr.started_ns).c_str(), iso(lr.ended_ns).c_str(), lr.who.c_str(),
                 lr.result.empty() ? "no end recorded (killed, or still running)" : lr.result.c_str(),
                 (unsigned long long)lr.migrated, (unsigned long long)lr.failed, hb(lr.bytes).c_str(), run_secs,
                 run_secs >= 1 ? (" (" + util::human_bytes(static_cast<double>(lr.bytes) / run_secs) + "/s)").c_str() : "");
    if (st.eta_seconds > 0)
        h += st.eta_seconds < 120 ? fmt("eta        %.0f s for what is pending, at the last run's pace\n", st.eta_seconds)
                                  : fmt("eta        %.0f min for what is pending, at the last run's pace\n", st.eta_seconds / 60);
    if (!st.lock_holder.empty()) h += fmt("lock       held by %s\n", st.lock_holder.c_str());
    if (compression != "none")
        h += fmt("compress   %s: %s of contents stored in %s (ratio %.2f, %s saved by compression)\n", compression.c_str(),
                 hb(t.object_bytes).c_str(), hb(t.stored_bytes).c_str(), ratio,
                 util::human_bytes(static_cast<double>(t.object_bytes - t.stored_bytes)).c_str());
    if (!failures.empty()) {
        h += "failed:\n";
        size_t n = 0;
        for (auto& [name, err] : failures) {
            if (n++ == 10) {
                h += fmt("  ... and %zu more (casmig --json status; sqlite3 store.db)\n", failures.size() - 10);
                break;
            }
            h += "  " + (err.empty() ? name : err) + "\n";
        }
    }
    if (!st.verify_failures.empty()) {
        h += fmt("verify failed after cutover (%zu package(s); each stays verified until fixed: docs/operations.md, "
                 "\"A package fails verify after cutover\"):\n",
                 st.verify_failures.size());
        size_t n = 0;
        for (const auto& f : st.verify_failures) {
            if (n++ == 10) {
                h += fmt("  ... and %zu more (casmig list --verify-failed)\n", st.verify_failures.size() - 10);
                break;
            }
            h += "  " + iso(f.at_ns) + "  " + f.error + "\n";
        }
    }
    if (!journal.empty()) {
        h += "journal (newest first):\n";
        for (auto& r : journal) {
            time_t secs = static_cast<time_t>(r.at_ns / 1'000'000'000);
            char when[32];
            std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&secs));
            // A run's end row carries its start for status (migrate::k_run_ended); people read the result.
            std::string detail = r.detail;
            if (detail.rfind(migrate::k_run_ended, 0) == 0) detail = detail.substr(0, detail.find("; started_ns"));
            h += fmt("  %s %-8s %s %s%s%s%s\n", when, r.command.c_str(), r.package.substr(0, 16).c_str(),
                     r.from.c_str(), r.from.empty() && r.to.empty() ? "" : " -> ", r.to.c_str(),
                     detail.empty() ? "" : ("  " + detail.substr(0, 100)).c_str());
        }
    }
    j["journal"] = json::array();
    for (auto& r : journal)
        j["journal"].push_back({{"at_ns", r.at_ns}, {"who", r.who}, {"command", r.command}, {"package", r.package},
                                {"from", r.from}, {"to", r.to}, {"detail", r.detail}});
    c.out(j, h);
    return k_ok;
}

// ------------------------------------------------------------------ verify

int cmd_verify(Ctx& c, const std::vector<std::string>& names, bool objects, bool objects_only,
               std::optional<std::uint64_t> sample) {
    auto lock = c.lock("verify");
    auto& s = *c.store;
    catalog::RelaxedDurability relaxed(s.catalog().db()); // verify records results, no intent
    s.discover();
    auto& cat = s.catalog();
    std::vector<catalog::Package> todo;
    if (!names.empty()) {
        for (const auto& n : names) {
            auto p = cat.package(n);
            if (!p) throw util::UsageError("package " + util::printable(n) + " is not in store " + s.root() +
                                           ": check the id with casmig list");
            todo.push_back(*p);
        }
    } else {
        for (const auto& p : cat.packages())
            if (p.has_manifest) todo.push_back(p);
    }
    if (sample && *sample < todo.size()) {
        std::srand(static_cast<unsigned>(::time(nullptr) ^ ::getpid()));
        for (size_t i = 0; i < *sample; ++i) std::swap(todo[i], todo[i + static_cast<size_t>(std::rand()) % (todo.size() - i)]);
        todo.resize(static_cast<size_t>(*sample));
    }
    if (objects_only) todo.clear(); // the store's own check, like ostree fsck: no legacy tree is read
    objects = objects || objects_only;
    verify::Options vo;
    vo.threads = c.g.jobs;
    auto r = verify::verify_packages(s, todo, vo, c.progress(), c.problem_sink());
    verify::Result ro;
    if (objects) ro = verify::verify_objects(s, vo, c.progress(), c.problem_sink());
    json j = {{"packages", r.packages}, {"ok", r.ok}, {"mismatched", r.mismatched}};
    if (objects) {
        j["objects"] = {{"checked", ro.objects_checked}, {"bad", ro.objects_bad}};
        j["manifests"] = {{"checked", ro.manifests_checked}, {"bad", ro.manifests_bad}};
    }
    std::string h = fmt("verify: %llu packages checked, %llu ok, %llu with problems", (unsigned long long)r.packages,
                        (unsigned long long)r.ok, (unsigned long long)r.mismatched);
    if (objects)
        h = (objects_only ? std::string("verify: ") : h + "; ") +
            fmt("%llu objects and %llu manifests re-hashed, %llu bad", (unsigned long long)ro.objects_checked,
                (unsigned long long)ro.manifests_checked, (unsigned long long)(ro.objects_bad + ro.manifests_bad));
    if (r.interrupted || ro.interrupted) note_interrupted(j);
    c.out(j, h + "\n");
    if (r.interrupted || ro.interrupted)
        return interrupted(fmt("%llu packages checked (%llu with problems), %llu not checked%s; what was checked is "
                               "recorded: run casmig verify again",
                               (unsigned long long)r.packages, (unsigned long long)r.mismatched, (unsigned long long)r.left,
                               objects ? ", the objects check stopped part-way" : ""));
    return r.mismatched || ro.objects_bad || ro.manifests_bad || c.problems ? k_failed : k_ok;
}

// ------------------------------------------------------------------ lifecycle

int cmd_cutover(Ctx& c) {
    auto lock = c.lock("cutover", store::Purpose::destroy);
    auto r = lifecycle::cutover(*c.store, c.g.jobs, c.progress(), c.problem_sink());
    c.out({{"mode", "file-level"}, {"packages", r.packages}, {"marked", r.marked}},
          fmt("cutover: %llu packages verified, store is file-level, %llu legacy trees marked for cleanup\n",
              (unsigned long long)r.packages, (unsigned long long)r.marked));
    return k_ok;
}

int cmd_cleanup(Ctx& c, bool dry) {
    auto lock = c.lock("cleanup", dry ? store::Purpose::dry_run : store::Purpose::destroy);
    auto r = lifecycle::cleanup(*c.store, dry ? lifecycle::DryRun::yes : lifecycle::DryRun::no, c.g.jobs, c.progress(),
                                c.problem_sink());
    // freed_bytes keeps its meaning (apparent sizes, as before); freed_allocated_bytes is the disk space
    // the filesystem got back, which is what the text reports first.
    json j = {{"dry_run", dry}, {"trees", r.trees}, {"freed_bytes", r.bytes}, {"freed_allocated_bytes", r.allocated},
              {"skipped", r.skipped}};
    if (r.interrupted) note_interrupted(j);
    c.out(j,
          fmt("cleanup%s: %llu legacy trees %s, %s %s on disk (%s of file contents)%s\n", dry ? " --dry-run" : "",
              (unsigned long long)r.trees, dry ? "would be removed" : "removed", hb(r.allocated).c_str(),
              dry ? "would be freed" : "freed", hb(r.bytes).c_str(),
              r.skipped ? fmt(", %llu skipped (see above)", (unsigned long long)r.skipped).c_str() : ""));
    if (r.interrupted)
        return interrupted(fmt("%llu legacy trees %s, %llu left marked for cleanup; run casmig cleanup%s to continue",
                               (unsigned long long)r.trees, dry ? "checked" : "removed", (unsigned long long)r.left,
                               dry ? " --dry-run" : ""));
    return r.skipped || c.problems ? k_failed : k_ok;
}

int cmd_rollback(Ctx& c, bool space_check) {
    auto lock = c.lock("rollback", store::Purpose::destroy);
    auto r = lifecycle::rollback(*c.store, c.g.jobs, space_check ? lifecycle::SpaceCheck::yes : lifecycle::SpaceCheck::no,
                                 c.progress(), c.problem_sink());
    std::string mode = catalog::to_string(c.store->catalog().mode());
    json j = {{"mode", mode}, {"packages", r.packages}, {"rebuilt", r.rebuilt}, {"files", r.files}, {"bytes", r.bytes},
              {"failed", r.failed}, {"linked_across_packages", r.linked_across}};
    if (r.interrupted) note_interrupted(j);
    c.out(j,
          r.interrupted ? fmt("rollback: %llu packages rolled back, %llu legacy trees rebuilt, %llu left to rebuild; "
                              "store stays %s\n",
                              (unsigned long long)r.packages, (unsigned long long)r.rebuilt, (unsigned long long)r.left,
                              mode.c_str())
          : r.failed ? fmt("rollback: %llu package(s) could not be restored (listed above), store stays %s; %llu packages "
                         "rolled back, %llu legacy trees rebuilt; fix the cause and rollback again\n",
                         (unsigned long long)r.failed, mode.c_str(), (unsigned long long)r.packages,
                         (unsigned long long)r.rebuilt)
                   : fmt("rollback: store is legacy; %llu packages rolled back, %llu legacy trees rebuilt from the CAS "
                         "(%llu files, %s%s)\n",
                         (unsigned long long)r.packages, (unsigned long long)r.rebuilt, (unsigned long long)r.files,
                         hb(r.bytes).c_str(),
                         r.linked_across ? fmt("; %llu hard links across packages restored",
                                               (unsigned long long)r.linked_across).c_str()
                                         : ""));
    if (r.interrupted)
        return interrupted(fmt("%llu legacy trees rebuilt, %llu left to rebuild (store stays %s); run casmig rollback to "
                               "continue",
                               (unsigned long long)r.rebuilt, (unsigned long long)r.left, mode.c_str()));
    return r.failed || c.problems ? k_failed : k_ok;
}

int cmd_rebuild_catalog(Ctx& c, bool force) {
    auto lock = c.store->lock("rebuild-catalog", store::Purpose::rebuild);
    auto r = lifecycle::rebuild_catalog(*c.store, force, c.g.jobs, c.progress(), c.problem_sink());
    lifecycle::recover(*c.store, c.problem_sink()); // half-built rollback trees, with the new catalog
    if (auto w = store::mirror_step([&] { lifecycle::sync_packages(*c.store); })) c.bar->println("casmig: warning: " + *w);
    c.out({{"mode", r.mode}, {"packages", r.packages}, {"recovered", r.recovered}, {"pending", r.pending},
           {"failed", r.failed}, {"lost", r.lost}, {"objects", r.objects}, {"objects_quarantined", r.objects_quarantined},
           {"trees_moved_back", r.trees_moved_back}, {"old_catalog", r.old_catalog}, {"reason", r.reason},
           {"mode_inferred", r.mode_inferred}, {"compression", r.compression}},
          fmt("rebuild-catalog: %s rebuilt, store is %s%s; %llu packages: %llu recovered with their manifests, %llu "
              "pending (migrate takes them again), %llu failed, %llu lost; %llu objects; the journal before the "
              "rebuild is not recoverable%s\n",
              c.store->db_path().c_str(), r.mode.c_str(), r.mode_inferred ? " (inferred from the trees)" : "",
              (unsigned long long)r.packages, (unsigned long long)r.recovered, (unsigned long long)r.pending,
              (unsigned long long)r.failed, (unsigned long long)r.lost, (unsigned long long)r.objects,
              r.old_catalog.empty() ? "" : ("; the old catalog is kept at " + r.old_catalog).c_str()));
    return r.failed || r.lost || c.problems ? k_failed : k_ok;
}

int cmd_materialize(Ctx& c, const std::string& pkg, const std::string& dest, const std::string& link) {
    lifecycle::LinkMode m = link == "hardlink" ? lifecycle::LinkMode::hardlink
                            : link == "reflink" ? lifecycle::LinkMode::reflink
                                                : lifecycle::LinkMode::copy;
    c.store->check_catalog(store::Purpose::read, "materialize");
    auto r = lifecycle::materialize(*c.store, pkg, dest, m);
    c.out({{"files", r.files}, {"dirs", r.dirs}, {"symlinks", r.symlinks}, {"bytes", r.bytes}, {"linked", r.linked},
           {"reflinked", r.reflinked}, {"copied", r.copied}, {"decompressed", r.decompressed}},
          (c.g.verbose ? fmt("materialize: %llu files (%llu linked, %llu reflinked, %llu copied), %llu dirs, %llu symlinks, %s\n",
                             (unsigned long long)r.files, (unsigned long long)r.linked, (unsigned long long)r.reflinked,
                             (unsigned long long)r.copied, (unsigned long long)r.dirs, (unsigned long long)r.symlinks,
                             hb(r.bytes).c_str())
                       : std::string()) +
              (r.decompressed && m != lifecycle::LinkMode::copy
                   ? fmt("materialize: %llu files copied (decompressed) instead of %s: their objects are stored compressed "
                         "(zstd store mode)\n",
                         (unsigned long long)r.decompressed, m == lifecycle::LinkMode::hardlink ? "hard-linked" : "reflinked")
                   : std::string()));
    return k_ok;
}

int cmd_add(Ctx& c, const std::string& pkg, const std::string& dir) {
    auto lock = c.lock("add");
    auto r = lifecycle::add_package(*c.store, pkg, dir, c.g.jobs, c.problem_sink());
    json j = {{"package", pkg}, {"added", !r.failed && !r.interrupted}, {"files", r.files}, {"bytes", r.bytes},
              {"new_objects", r.new_objects}, {"new_object_bytes", r.new_object_bytes}, {"seconds", r.seconds}};
    if (r.interrupted) {
        note_interrupted(j);
        c.out(j, "");
        return interrupted("package " + util::printable(pkg) + " was not added, nothing recorded; run casmig add " +
                           util::printable(pkg) + " " + dir + " again");
    }
    c.out(j,
          r.failed ? fmt("add: %s not added (problems above): nothing recorded; gc removes what it wrote\n", util::printable(pkg).c_str())
                   : fmt("add: %s added, verified: %llu files, %s (%llu new objects, %s) in %.2fs\n",
                         util::printable(pkg).c_str(), (unsigned long long)r.files, hb(r.bytes).c_str(),
                         (unsigned long long)r.new_objects, hb(r.new_object_bytes).c_str(), r.seconds));
    return r.failed || c.problems ? k_failed : k_ok;
}

int cmd_doctor(Ctx& c) {
    auto r = lifecycle::doctor(*c.store, lifecycle::DoctorOptions{});
    nlohmann::json findings = nlohmann::json::array();
    std::string text;
    for (const auto& f : r.findings) {
        findings.push_back({{"severity", lifecycle::to_string(f.severity)}, {"check", f.check}, {"message", f.message}});
        text += std::string(lifecycle::to_string(f.severity)) + ": " + f.check + ": " + f.message + "\n";
    }
    if (r.healthy) text += "doctor: " + c.store->root() + " is healthy (mode " + r.mode + ")\n";
    if (!r.lock_holder.empty()) text += "note: the store lock is held by " + r.lock_holder + "\n";
    c.out({{"healthy", r.healthy}, {"mode", r.mode}, {"findings", findings}, {"lock_holder", r.lock_holder},
           {"free_bytes", r.free_bytes}, {"pending_bytes", r.pending_bytes}},
          text);
    return r.healthy ? k_ok : k_failed;
}

int cmd_remove(Ctx& c, const std::string& pkg) {
    auto lock = c.lock("remove", store::Purpose::destroy);
    if (auto w = lifecycle::remove_package(*c.store, pkg)) c.bar->println("casmig: warning: " + *w);
    c.out({{"removed", pkg}}, c.g.verbose ? "removed " + util::printable(pkg) + "\n" : "");
    return k_ok;
}

int cmd_gc(Ctx& c, bool dry) {
    auto lock = c.lock("gc", dry ? store::Purpose::dry_run : store::Purpose::destroy);
    auto r = lifecycle::gc(*c.store, dry ? lifecycle::DryRun::yes : lifecycle::DryRun::no);
    std::string extra;
    if (r.removed_manifests || r.removed_refs)
        extra = fmt("; %llu manifest objects and %llu stale package references in packages/ %s",
                    (unsigned long long)r.removed_manifests, (unsigned long long)r.removed_refs,
                    dry ? "would be removed" : "removed");
    c.out({{"dry_run", dry}, {"removed_objects", r.removed_objects}, {"freed_bytes", r.freed_bytes},
           {"removed_manifests", r.removed_manifests}, {"removed_refs", r.removed_refs}},
          fmt("gc%s: %llu unreferenced objects %s, %s%s\n", dry ? " --dry-run" : "", (unsigned long long)r.removed_objects,
              dry ? "would be removed" : "removed", hb(r.freed_bytes).c_str(), extra.c_str()));
    return k_ok;
}

// ------------------------------------------------------------------ list, show

int cmd_list(Ctx& c, const std::string& state, bool verify_failed) {
    auto rows = lifecycle::list_packages(*c.store);
    json arr = json::array();
    std::vector<std::array<std::string, 6>> cells;
    for (const auto& r : rows) {
        if (!state.empty() && state != catalog::to_string(r.state)) continue;
        if (verify_failed && r.verify_error.empty()) continue;
        const std::string id = util::printable(r.name);
        arr.push_back({{"id", id}, {"state", catalog::to_string(r.state)}, {"tree", catalog::to_string(r.tree)},
                       {"files", r.files ? json(*r.files) : json(nullptr)}, {"bytes", r.bytes ? json(*r.bytes) : json(nullptr)},
                       {"error", r.error.empty() ? json(nullptr) : json(r.error)},
                       {"verify_error", r.verify_error.empty() ? json(nullptr) : json(r.verify_error)}});
        // A verified package's failed verify shows in the error column, said as such.
        std::string err = !r.error.empty() ? r.error : r.verify_error.empty() ? "" : "(verify after cutover failed) " + r.verify_error;
        cells.push_back({id, catalog::to_string(r.state), catalog::to_string(r.tree),
                         r.files ? std::to_string(*r.files) : "-", r.bytes ? std::to_string(*r.bytes) : "-", err});
    }
    // Columns: id, state, tree (left-aligned), files, bytes (right-aligned, exact), error (only if any).
    // Built by concatenation, not fmt(): an id or an error can be longer than its buffer.
    std::array<size_t, 5> w{};
    for (const auto& row : cells)
        for (size_t i = 0; i < w.size(); ++i) w[i] = std::max(w[i], row[i].size());
    std::string h;
    for (const auto& row : cells) {
        std::string line;
        for (size_t i = 0; i < w.size(); ++i) {
            const std::string pad(w[i] - row[i].size(), ' ');
            line += (i ? "  " : "") + (i < 3 ? row[i] + pad : pad + row[i]);
        }
        if (!row[5].empty()) line += "  " + row[5];
        else line.erase(line.find_last_not_of(' ') + 1);
        h += line + "\n";
    }
    c.out({{"packages", arr}}, h);
    return k_ok;
}

int cmd_show(Ctx& c, const std::string& pkg) {
    std::vector<manifest::Entry> entries;
    auto source = lifecycle::package_entries(*c.store, pkg, [&](const manifest::Entry& e) {
        entries.push_back(e);
        return true;
    });
    const bool from_manifest = source == lifecycle::EntrySource::manifest;
    auto type_name = [](manifest::EntryType t) {
        return t == manifest::EntryType::dir ? "dir" : t == manifest::EntryType::symlink ? "symlink" : "file";
    };
    json arr = json::array();
    size_t size_w = 1;
    for (const auto& e : entries) size_w = std::max(size_w, std::to_string(e.size).size());
    std::string h;
    for (const auto& e : entries) {
        const bool link = e.type == manifest::EntryType::symlink;
        arr.push_back({{"path", util::printable(e.path)}, {"type", type_name(e.type)}, {"mode", e.mode & 07777},
                       {"size", e.size}, {"digest", e.digest ? json(e.digest->hex()) : json(nullptr)},
                       {"target", link ? json(util::printable(e.target)) : json(nullptr)}});
        // Like `ostree ls -R`: type, mode, size, digest, path (from the package root), "-> target"; the
        // path and target by concatenation (fmt()'s buffer is smaller than a path can be).
        const char type = e.type == manifest::EntryType::dir ? 'd' : link ? 'l' : '-';
        std::string digest = e.digest ? e.digest->hex() : "-";
        if (from_manifest) digest.resize(64, ' ');
        h += fmt("%c %04o %*llu  ", type, e.mode & 07777, (int)size_w, (unsigned long long)e.size) + digest + "  /" +
             util::printable(e.path) + (link ? " -> " + util::printable(e.target) : "") + "\n";
    }
    c.out({{"package", util::printable(pkg)}, {"source", from_manifest ? "manifest" : "legacy_tree"}, {"entries", arr}}, h);
    return k_ok;
}

// ------------------------------------------------------------------ the frame: help, config, usage errors

constexpr const char* k_default_config = "/etc/casmig.conf";

/// The end of every command's --help: one example, then the exit codes (the same for every command).
void add_help_footers(CLI::App& app) {
    const std::string codes = "Exit codes: 0 success; 1 finished, but something failed; 2 usage error or unusable input;\n"
                              "            3 refused, the store is unchanged; 4 busy: another casmig holds the store lock;\n"
                              "            130/143 stopped by SIGINT/SIGTERM at a safe point (rerun to continue)";
    const std::map<std::string, std::string> examples{
        {"", "casmig --store /opt/pm/store plan"},
        {"plan", "casmig plan --limit 500"},
        {"migrate", "casmig migrate --limit 2000 --time-budget 45m --io-limit 100M"},
        {"convert", "casmig convert --compress=6 --time-budget 2h"},
        {"status", "casmig --json status"},
        {"list", "casmig list --state failed"},
        {"show", "casmig show hello-1.0"},
        {"verify", "casmig verify --sample 100"},
        {"cutover", "casmig cutover"},
        {"cleanup", "casmig cleanup --dry-run"},
        {"rollback", "casmig rollback"},
        {"materialize", "casmig materialize hello-1.0 /srv/hello --link hardlink"},
        {"add", "casmig add hello-1.1 /var/cache/pm/staging/hello-1.1"},
        {"remove", "casmig remove hello-1.0"},
        {"doctor", "casmig --json doctor"},
        {"gc", "casmig gc --dry-run"},
        {"rebuild-catalog", "casmig rebuild-catalog"},
        {"help", "casmig help migrate"},
    };
    auto footer = [&](CLI::App* a, const std::string& name) {
        auto it = examples.find(name);
        a->footer("Example: " + (it != examples.end() ? it->second : "casmig " + name) + "\n\n" + codes);
    };
    footer(&app, "");
    for (auto* sc : app.get_subcommands([](CLI::App*) { return true; })) footer(sc, sc->get_name());
}

/// The config file (TOML or INI, through CLI11): top-level keys set the global options (json excepted:
/// the output format is the caller's), sections [plan] and [migrate] their limits. Any other key is a
/// usage error (see config_error()); the command line overrides the file. docs/operations.md lists the keys.
void setup_config(CLI::App& app) {
    app.set_config("--config", k_default_config,
                   std::string("Read options from this TOML/INI file (default ") + k_default_config +
                       ", if it exists); the command line overrides it");
    app.allow_config_extras(CLI::config_extras_mode::error);
    if (auto* j = app.get_option_no_throw("--json")) j->configurable(false);
    const std::set<std::string> limits{"limit", "time-budget", "io-limit"};
    for (auto* sc : app.get_subcommands([](CLI::App*) { return true; })) {
        const bool selects = sc->get_name() == "plan" || sc->get_name() == "migrate";
        for (auto* o : sc->get_options()) o->configurable(selects && limits.count(o->get_single_name()) > 0);
    }
}

std::vector<std::string> command_names(const CLI::App& app) {
    std::vector<std::string> out;
    for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; })) out.push_back(sc->get_name());
    return out;
}

/// "unknown command 'migrat': did you mean 'migrate'? (see casmig --help)"
std::string unknown_command(const CLI::App& app, const std::string& word) {
    auto near = util::closest(word, command_names(app));
    return "unknown command '" + util::printable(word) + "'" + (near ? ": did you mean '" + *near + "'?" : "") +
           " (see casmig --help)";
}

/// Long option names (without "--") of `cmd` and of the global options, which every command accepts.
std::vector<std::string> long_options(const CLI::App& app, const CLI::App* cmd) {
    std::vector<std::string> out;
    for (const CLI::App* a : {cmd, &app})
        if (a)
            for (const auto* o : a->get_options())
                for (const auto& n : o->get_lnames()) out.push_back(n);
    return out;
}

/// Names the first unknown command or option of a command line CLI11 refused, with the closest valid
/// one (CLI11 itself says "A subcommand is required" for a mistyped command); nullopt when every word
/// is known (then CLI11's own message is the better one).
std::optional<std::string> diagnose(const CLI::App& app, const std::vector<std::string>& args) {
    const CLI::App* cmd = nullptr;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--") break; // operands only from here on
        if (a.size() > 1 && a[0] == '-') {
            const bool is_long = a[1] == '-';
            const size_t eq = a.find('=');
            const std::string name = is_long ? a.substr(0, eq) : a.substr(0, 2);
            const CLI::Option* o = cmd ? cmd->get_option_no_throw(name) : nullptr;
            if (!o) o = app.get_option_no_throw(name);
            if (!o) {
                const std::string where = cmd ? " for " + cmd->get_name() : "";
                auto near = is_long ? util::closest(name.substr(2), long_options(app, cmd)) : std::nullopt;
                return "unknown option '" + util::printable(name) + "'" + where +
                       (near ? ": did you mean '--" + *near + "'?" : "") + " (see casmig" +
                       (cmd ? " " + cmd->get_name() : "") + " --help)";
            }
            // An option that takes a value takes the next word unless it came attached ("--limit=5", "-j4").
            const bool attached = is_long ? eq != std::string::npos : a.size() > 2;
            if (o->get_items_expected_min() > 0 && !attached) ++i;
            continue;
        }
        if (cmd) continue; // an operand of the command: CLI11 says whether it takes one
        for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; }))
            if (sc->get_name() == a) cmd = sc;
        if (!cmd) return unknown_command(app, a);
    }
    return std::nullopt;
}

/// A config file CLI11 refused, in one line naming the file and the key.
std::string config_error(CLI::App& app, const CLI::ConfigError& e) {
    std::string file = k_default_config;
    if (auto* o = app.get_config_ptr()) file = o->as<std::string>();
    // CLI11 names a key "SECTION.KEY"; the file spells it "KEY" under "[SECTION]".
    auto shown = [](const std::string& k) {
        auto dot = k.rfind('.');
        return dot == std::string::npos ? "'" + k + "'" : "'" + k.substr(dot + 1) + "' in [" + k.substr(0, dot) + "]";
    };
    auto in_file = [&](const std::string& k) { return (k.find('.') == std::string::npos ? " in" : " of") + std::string(" config file ") + file; };
    const std::string msg = e.what();
    const std::string unknown = "INI was not able to parse ", refused = ": This option is not allowed in a configuration file";
    if (msg.rfind(unknown, 0) == 0) {
        const std::string key = msg.substr(unknown.size());
        // CLI11 marks a section's start and end with the keys "SECTION.++" and "SECTION.--": an unknown one
        // is a section that names no command with keys.
        if (key.size() > 3 && (key.compare(key.size() - 3, 3, ".++") == 0 || key.compare(key.size() - 3, 3, ".--") == 0)) {
            const std::string section = key.substr(0, key.size() - 3);
            std::vector<std::string> sections;
            for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; }))
                if (!sc->get_options([](const CLI::Option* o) { return o->get_configurable(); }).empty())
                    sections.push_back(sc->get_name());
            auto near = util::closest(section, sections);
            return "unknown section [" + section + "] in config file " + file +
                   (near ? ": did you mean [" + *near + "]?" : "") + " (the keys: docs/operations.md, Configuration)";
        }
        // The keys a file may hold: the configurable global options, then "SECTION.KEY".
        std::vector<std::string> keys;
        for (const auto* o : app.get_options())
            if (o->get_configurable() && !o->get_lnames().empty()) keys.push_back(o->get_lnames()[0]);
        for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; }))
            for (const auto* o : sc->get_options())
                if (o->get_configurable() && !o->get_lnames().empty()) keys.push_back(sc->get_name() + "." + o->get_lnames()[0]);
        // A valid key in the wrong place ("limit" at the top, "jobs" in [migrate]) is suggested where it
        // belongs (the last match: [migrate] rather than [plan]); else the nearest key.
        std::optional<std::string> near;
        const std::string tail = key.substr(key.rfind('.') + 1);
        for (const auto& k : keys)
            if (k != key && (k == tail || (k.size() > tail.size() &&
                                           k.compare(k.size() - tail.size() - 1, std::string::npos, "." + tail) == 0)))
                near = k;
        if (!near) near = util::closest(key, keys);
        return "unknown key " + shown(key) + in_file(key) + (near ? ": did you mean " + shown(*near) + "?" : "") +
               " (the keys: docs/operations.md, Configuration)";
    }
    if (msg.size() > refused.size() && msg.compare(msg.size() - refused.size(), std::string::npos, refused) == 0) {
        const std::string key = msg.substr(0, msg.size() - refused.size());
        return "key " + shown(key) + in_file(key) + " is for the command line only: give --" +
               key.substr(key.rfind('.') + 1) + " on the command line";
    }
    return "config file " + file + ": " + msg;
}

/// `casmig help [CMD]`: exactly what `casmig --help` and `casmig CMD --help` print.
int cmd_help(const CLI::App& app, const std::string& topic) {
    if (topic.empty()) {
        std::cout << app.get_formatter()->make_help(&app, app.get_name(), CLI::AppFormatMode::Normal);
        return k_ok;
    }
    for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; }))
        if (sc->get_name() == topic) {
            std::cout << sc->get_formatter()->make_help(sc, app.get_name() + " " + topic, CLI::AppFormatMode::Normal);
            return k_ok;
        }
    throw util::UsageError(unknown_command(app, topic));
}

} // namespace

/// With --json, a command that stops on an error still prints one JSON document on stdout: {"error":
/// {"kind", "message", "exit_code"}} (the one line also went to stderr). Returns code.
int json_error(const Globals& g, int code, const char* kind, const std::string& message) {
    if (g.json) std::cout << json{{"error", {{"kind", kind}, {"message", message}, {"exit_code", code}}}}.dump(2) << std::endl;
    return code;
}

int casmig_main(int argc, char** argv) {
    casmig::hash::init(); // BLAKE3's CPU probe, before any worker thread exists (see its contract)
    Globals g;
    CLI::App app{"casmig: migrate a package store from per-package trees to a file-level content-addressed store", "casmig"};
    app.fallthrough(); // global options are accepted after COMMAND too
    app.require_subcommand(1);
    app.set_help_all_flag("--help-all", "Show help for every command");
    app.set_version_flag("--version", std::string("casmig ") + CASMIG_VERSION, "Print casmig's version and exit");
    app.add_option("--store", g.store, "Store directory (default: $CASMIG_STORE, then the config file's store, then /opt/pm/store)");
    app.add_option("--db", g.db, "Catalog file (default: STORE/store.db)");
    app.add_option("-j,--jobs", g.jobs, "Worker threads (default: all cores)")->check(CLI::Range(1u, 1024u));
    app.add_flag("--json", g.json, "Print one JSON document on stdout");
    app.add_option("--progress", g.progress, "Progress bar on stderr: auto (on a TTY), always, never")
        ->check(CLI::IsMember({"auto", "always", "never"}));
    app.add_flag("-q,--quiet", g.quiet, "Print only errors");
    app.add_flag("-v,--verbose", g.verbose, "Print more");
    app.add_option("--metrics-file", g.metrics_file,
                   "Write Prometheus metrics (store counts, this run's outcome) to FILE at the end, atomically");
    app.add_option("--lock-wait", g.lock_wait,
                   "Wait up to DUR for the store lock another casmig holds (e.g. 30s, 10m; default 0: exit 4 at once)");

    migrate::Options mo;
    // Raw values, parsed below where a bad value is one usage line. plan and migrate each have their
    // own: a config file's [migrate] keys are migrate's only (and a bad one never stops another command).
    struct Selection {
        std::vector<std::string> packages;
        std::string time_budget, io_limit, limit;
        bool retry = false;
    } plan_sel, mig_sel;
    bool no_verify = false, no_space_check = false;
    auto add_selection = [&](CLI::App* sc, Selection& sel) {
        sc->add_option("packages", sel.packages, "Package ids (legacy directory names); default: all pending");
        sc->add_option("--limit", sel.limit, "At most N packages this run (1 to 1000000000)");
        sc->add_option("--time-budget", sel.time_budget, "Start no package after this long (e.g. 90s, 30m, 2h; 0 to 3650d)");
        sc->add_option("--io-limit", sel.io_limit, "Read at most this many bytes/s from legacy trees (e.g. 50M; 1 to 1024T)");
        sc->add_flag("--retry-failed", sel.retry, "Also retry packages that failed before");
    };
    auto* plan = app.add_subcommand("plan", "Dry run: hash what migrate would read and report counts; writes nothing");
    add_selection(plan, plan_sel);
    auto* mig = app.add_subcommand("migrate", "Migrate pending (or the named) packages into the CAS, then verify them");
    add_selection(mig, mig_sel);
    mig->add_flag("--no-verify", no_verify, "Skip the verify pass after writing");
    std::string compress;
    bool no_dictionary = false;
    mig->add_flag("--compress{6}", compress,
                  "zstd store mode, chosen on the store's first migrate: --compress or --compress=LEVEL (1 to 22, "
                  "default 6); later migrates keep the mode");
    mig->add_flag("--no-dictionary", no_dictionary, "With the first --compress: train no zstd dictionary");
    mig->add_flag("--no-space-check", no_space_check,
                  "Start even if the packages may not fit in the free space; migrate what fits, leave the rest pending");
    auto* conv = app.add_subcommand("convert", "Convert the store's objects to the zstd mode (--compress) or back (--raw); "
                                               "resumable, runs beside readers");
    std::string conv_compress;
    bool conv_raw = false, conv_no_dictionary = false;
    conv->add_flag("--compress{6}", conv_compress,
                   "Compress every object worth it: --compress or --compress=LEVEL (1 to 22, default 6); records "
                   "the zstd mode first");
    conv->add_flag("--no-dictionary", conv_no_dictionary, "With --compress on a raw store: train no zstd dictionary");
    conv->add_flag("--raw", conv_raw, "Back to a raw store: every object uncompressed, the zstd mode dropped first");
    std::string conv_budget;
    conv->add_option("--time-budget", conv_budget,
                     "Start no shard of objects/ after this long (e.g. 90s, 30m, 2h); a rerun continues");
    auto* status = app.add_subcommand("status", "Store mode, package states, object and byte counts, recent journal");
    std::string journal_lines = "5";
    status->add_option("--journal", journal_lines, "Journal rows to show (0 to 1000000, default 5)");
    auto* ver = app.add_subcommand("verify", "Compare migrated packages with their legacy trees (and objects with their names)");
    std::vector<std::string> verify_pkgs;
    bool verify_objects = false;
    std::string sample;
    auto* verify_pkgs_opt = ver->add_option("packages", verify_pkgs, "Package ids (default: every package with a manifest)");
    ver->add_flag("--objects", verify_objects, "Also re-hash every object against its name (fsck)");
    bool verify_objects_only = false;
    auto* only = ver->add_flag("--objects-only", verify_objects_only,
                               "Only re-hash every object and manifest against its name; read no legacy tree");
    auto* sample_opt = ver->add_option("--sample", sample, "Check N random packages (1 to 1000000000)");
    only->excludes(sample_opt);
    only->excludes(verify_pkgs_opt);
    auto* cut = app.add_subcommand("cutover", "Switch the store to file-level and mark legacy trees for cleanup");
    auto* clean = app.add_subcommand("cleanup", "Delete legacy trees marked by cutover (their content is in the CAS)");
    bool dry = false;
    clean->add_flag("--dry-run", dry, "Report what would be deleted");
    auto* rb = app.add_subcommand("rollback", "Back to legacy mode, rebuilding removed legacy trees from the CAS");
    bool rb_no_space_check = false;
    rb->add_flag("--no-space-check", rb_no_space_check, "Rebuild even if free space looks short (reflink filesystems)");
    auto* mat = app.add_subcommand("materialize", "Rebuild a package tree at DEST from its manifest");
    std::string mat_pkg, mat_dest, mat_link = "copy";
    mat->add_option("package", mat_pkg, "Package id")->required();
    mat->add_option("dest", mat_dest, "Destination (must not exist or be empty)")->required();
    mat->add_option("--link", mat_link, "copy, reflink or hardlink")->check(CLI::IsMember({"copy", "reflink", "hardlink"}));
    auto* add = app.add_subcommand("add", "Add a package straight in file-level form from a staging directory (no legacy tree)");
    std::string add_pkg, add_dir;
    add->add_option("package", add_pkg, "New package id")->required();
    add->add_option("dir", add_dir, "Staging directory holding the package's files (only read)")->required();
    auto* doc = app.add_subcommand("doctor", "Check the store's health: catalog, failures, progress, integrity, space, temp/, lock");
    auto* rem = app.add_subcommand("remove", "Drop a package: manifest and legacy tree (objects stay for gc)");
    std::string rem_pkg;
    rem->add_option("package", rem_pkg, "Package id")->required();
    auto* gcc = app.add_subcommand("gc", "Delete objects no package references");
    bool gc_dry = false;
    gcc->add_flag("--dry-run", gc_dry, "Report what would be deleted");
    auto* rbc = app.add_subcommand("rebuild-catalog", "Recreate store.db from the store itself (packages/, objects/, legacy trees)");
    bool rbc_force = false;
    rbc->add_flag("--force", rbc_force, "Rebuild even a catalog that fits its store (the old one is kept aside)");
    auto* listc = app.add_subcommand("list", "One line per package: id, state, legacy tree, files, bytes, error");
    std::string list_state;
    listc->add_option("--state", list_state, "Only packages in this state")
        ->check(CLI::IsMember({"pending", "in_progress", "migrated", "verified", "failed", "rolled_back"}));
    bool list_verify_failed = false;
    listc->add_flag("--verify-failed", list_verify_failed,
                    "Only verified packages whose last verify after cutover failed (status shows them too)");
    auto* showc = app.add_subcommand("show", "A package's entries (its manifest, or its legacy tree before it is verified)");
    std::string show_pkg;
    showc->add_option("package", show_pkg, "Package id")->required();
    auto* helpc = app.add_subcommand("help", "Show help for casmig or for one command (as --help does)");
    std::string help_topic;
    helpc->add_option("command", help_topic, "A command");
    add_help_footers(app); // after every command exists
    setup_config(app);
    // What the raw command line says, for the cases CLI11 cannot answer: a usage error before the
    // options are known, and where --store came from (below). "--opt VALUE" or "--opt=VALUE"; a flag
    // gives "". Up to "--".
    const auto from_argv = [&](std::string_view opt) -> std::optional<std::string> {
        for (int i = 1; i < argc; ++i) {
            std::string_view a = argv[i];
            if (a == "--") break;
            if (a == opt) return i + 1 < argc ? std::string(argv[i + 1]) : std::string();
            if (a.size() > opt.size() && a.rfind(opt, 0) == 0 && a[opt.size()] == '=') return std::string(a.substr(opt.size() + 1));
        }
        return std::nullopt;
    };
    const char* env_store = std::getenv("CASMIG_STORE");
    // A bad value that is not on the command line came from the config file: the error names the file
    // (where to fix it). opt is the long spelling; -j is --jobs's short one.
    const auto from_config = [&](const std::string& opt) -> std::string {
        if (from_argv(opt) || (opt == "--jobs" && std::any_of(argv + 1, argv + argc, [](const char* a) {
                                   return std::string_view(a).rfind("-j", 0) == 0;
                               })))
            return "";
        const auto* c = app.get_config_ptr();
        return " (set in config file " + (c ? c->as<std::string>() : std::string(k_default_config)) + ")";
    };
    auto usage_error = [&](const std::string& line) {
        std::fprintf(stderr, "casmig: %s\n", line.c_str());
        // A command line (or config file) the nightly timer can no longer run must show in monitoring:
        // with --metrics-file on the command line, the run is recorded (exit 2) like any other.
        if (auto metrics = from_argv("--metrics-file"); metrics && !metrics->empty()) {
            std::string command = "unknown";
            for (int i = 1; i < argc && command == "unknown"; ++i)
                for (const auto* sc : app.get_subcommands([](const CLI::App*) { return true; }))
                    if (sc->get_name() == argv[i]) command = argv[i];
            g_metrics.path = *metrics;
            g_metrics.command = command;
            g_metrics.store = from_argv("--store").value_or(env_store && *env_store ? env_store : "/opt/pm/store");
        }
        Globals jg;
        jg.json = from_argv("--json").has_value(); // still answers --json with its error object
        return json_error(jg, k_usage, "usage", line);
    };

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ConfigError& e) {
        return usage_error(config_error(app, e));
    } catch (const CLI::FileError& e) { // the --config file only: a missing default file is no error
        return usage_error("config file " + app.get_config_ptr()->as<std::string>() +
                           " cannot be read (missing, or not a file): check --config");
    } catch (const CLI::ParseError& e) {
        std::string msg = e.what();
        if (msg.empty()) msg = "invalid command line";
        if (msg == "A subcommand is required") msg = "no command given";
        if (auto d = diagnose(app, std::vector<std::string>(argv + 1, argv + argc))) return usage_error(*d);
        // A value CLI11 checked (a range, a set): "--jobs: Value 0 not in [1 - 1024]".
        if (msg.rfind("--", 0) == 0)
            if (auto colon = msg.find(':'); colon != std::string::npos)
                if (std::string where = from_config(msg.substr(0, colon)); !where.empty()) return usage_error(msg + where);
        return usage_error(msg + " (see casmig --help)");
    }
    // The store: --store on the command line, else $CASMIG_STORE, else the config file's `store`,
    // else /opt/pm/store. The environment beats the file, so that a runbook's `export CASMIG_STORE`
    // never acts on the store /etc/casmig.conf names (CLI11 alone would let the file win).
    if (!from_argv("--store") && env_store && *env_store) g.store = env_store;
    // Package ids are typed as list, status and every error print them (util::printable()): a byte
    // that is not printable UTF-8 as \xNN, a backslash as \x5c. An argument is read that way only if it
    // is exactly such a spelling (printable() of what it decodes to gives it back, hex digits in either
    // case): "foo\x2d1" is not ("-" is printed as itself), so it names the package "foo\x2d1" literally,
    // whose list spelling is "foo\x5cx2d1". The same text names the same package in every command, add
    // and remove included.
    auto typed_id = [](std::string& id) {
        if (id.find('\\') == std::string::npos) return;
        auto bytes = util::unprintable(id);
        if (!bytes) return;
        std::string back = util::printable(*bytes), typed = id;
        for (auto* t : {&back, &typed})
            for (auto& ch : *t) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        if (back == typed) id = std::move(*bytes);
    };
    for (auto* ids : {&plan_sel.packages, &mig_sel.packages, &verify_pkgs})
        for (auto& id : *ids) typed_id(id);
    for (auto* id : {&mat_pkg, &rem_pkg, &show_pkg, &add_pkg}) typed_id(*id);
    if (!g.metrics_file.empty()) { // from here on every exit is recorded, a bad option value's too
        for (auto* sub : app.get_subcommands()) g_metrics.command = sub->get_name();
        g_metrics.path = g.metrics_file;
        g_metrics.store = g.store.empty() ? "/opt/pm/store" : g.store;
        g_metrics.db = g.db;
    }

    try {
        // Each value is checked for its range here, before anything runs: a value out of range is a
        // usage error naming the option and the range, never wrapped or rounded into another meaning.
        auto option = [&](const char* name, auto parse) {
            try {
                return parse();
            } catch (const util::UsageError& e) {
                const std::string what = e.what();
                const bool named = what.find(name) != std::string::npos;
                throw util::UsageError((named ? "" : std::string(name) + ": ") + what + from_config(name));
            }
        };
        constexpr std::uint64_t k_max_packages = 1'000'000'000;
        const Selection none{}, &sel = *plan ? plan_sel : *mig ? mig_sel : none; // the running command's only
        mo.packages = sel.packages;
        if (!sel.limit.empty())
            mo.limit = option("--limit", [&] { return util::parse_count(sel.limit, 1, k_max_packages, "--limit"); });
        if (!sel.time_budget.empty())
            mo.time_budget = option("--time-budget", [&] { return util::parse_duration(sel.time_budget); });
        if (!g.lock_wait.empty()) g.lock_wait_ms = option("--lock-wait", [&] { return util::parse_duration(g.lock_wait); });
        // At least 1 byte/s (0 would mean "unlimited" to the pipeline), at most 1024T/s.
        if (!sel.io_limit.empty())
            mo.io_limit = option("--io-limit", [&] { return util::parse_bytes(sel.io_limit, 1, 1ull << 50); });
        std::optional<std::uint64_t> sample_n;
        if (!sample.empty()) sample_n = option("--sample", [&] { return util::parse_count(sample, 1, k_max_packages, "--sample"); });
        const int journal_n = static_cast<int>(
            option("--journal", [&] { return util::parse_count(journal_lines, 0, 1'000'000, "--journal"); }));
        mo.retry_failed = sel.retry ? migrate::RetryFailed::yes : migrate::RetryFailed::no;
        if (!compress.empty())
            mo.compress = static_cast<int>(option("--compress", [&] { return util::parse_count(compress, 1, 22, "--compress"); }));
        mo.dictionary = no_dictionary ? migrate::Dictionary::no : migrate::Dictionary::yes;
        mo.verify = no_verify ? migrate::Verify::no : migrate::Verify::yes;
        mo.space_check = no_space_check ? migrate::SpaceCheck::no : migrate::SpaceCheck::yes;
        mo.threads = g.jobs;
        migrate::ConvertOptions co;
        if (*conv) {
            if (conv_raw == !conv_compress.empty())
                throw util::UsageError("convert needs exactly one of --compress[=LEVEL] and --raw");
            if (conv_raw && conv_no_dictionary) throw util::UsageError("convert: --no-dictionary goes with --compress only");
            co.target = conv_raw ? migrate::Target::raw : migrate::Target::zstd;
            // As with migrate: the level new objects get (a bare --compress means 6).
            if (!conv_compress.empty()) co.level = static_cast<int>(util::parse_count(conv_compress, 1, 22, "--compress"));
            co.dictionary = conv_no_dictionary ? migrate::Dictionary::no : migrate::Dictionary::yes;
            co.threads = g.jobs;
            if (!conv_budget.empty())
                co.time_budget = option("--time-budget", [&] { return util::parse_duration(conv_budget); });
        }
        if (*helpc) return cmd_help(app, help_topic); // needs no store
        if (*mig || *conv || *ver || *clean || *rb || *add) stop_at_safe_points();
        Ctx c(g);
        if (!g.metrics_file.empty()) g_metrics.store = c.store->root();
        struct Problems {
            Ctx& c;
            ~Problems() { g_metrics.problems_seen = c.problems; }
        } problems_on_exit{c};
        if (*plan) return cmd_plan(c, mo);
        if (*mig) return cmd_migrate(c, mo);
        if (*conv) return cmd_convert(c, co);
        if (*status) return cmd_status(c, journal_n);
        if (*ver) return cmd_verify(c, verify_pkgs, verify_objects, verify_objects_only, sample_n);
        if (*cut) return cmd_cutover(c);
        if (*clean) return cmd_cleanup(c, dry);
        if (*rb) return cmd_rollback(c, !rb_no_space_check);
        if (*mat) return cmd_materialize(c, mat_pkg, mat_dest, mat_link);
        if (*add) return cmd_add(c, add_pkg, add_dir);
        if (*doc) return cmd_doctor(c);
        if (*rem) return cmd_remove(c, rem_pkg);
        if (*gcc) return cmd_gc(c, gc_dry);
        if (*rbc) return cmd_rebuild_catalog(c, rbc_force);
        if (*listc) return cmd_list(c, list_state, list_verify_failed);
        if (*showc) return cmd_show(c, show_pkg);
    } catch (const util::InterruptedError& e) {
        std::fprintf(stderr, "casmig: %s\n", e.what());
        return json_error(g, 128 + e.signal(), "interrupted", e.what());
    } catch (const util::UsageError& e) {
        std::fprintf(stderr, "casmig: %s\n", e.what());
        return json_error(g, k_usage, "usage", e.what());
    } catch (const util::RefusedError& e) {
        std::fprintf(stderr, "casmig: refused: %s\n", e.what());
        return json_error(g, k_refused, "refused", e.what());
    } catch (const util::BusyError& e) {
        std::fprintf(stderr, "casmig: %s\n", e.what());
        return json_error(g, k_busy, "busy", e.what());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "casmig: error: %s\n", e.what());
        return json_error(g, k_failed, "error", e.what());
    }
    return k_usage;
}

int main(int argc, char** argv) {
    const auto started = std::chrono::steady_clock::now();
    int rc = casmig_main(argc, argv);
    if (!g_metrics.path.empty()) {
        try {
            store::Store s(g_metrics.store, g_metrics.db);
            casmig::lifecycle::RunInfo run{g_metrics.command, rc,
                                           std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(),
                                           g_metrics.problems_seen};
            casmig::lifecycle::write_metrics(s, g_metrics.path, run);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "casmig: warning: metrics file %s not written: %s\n", g_metrics.path.c_str(), e.what());
        }
    }
    return rc;
}
