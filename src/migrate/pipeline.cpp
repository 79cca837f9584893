#include "casmig/migrate/pipeline.hpp"

#include "casmig/migrate/ingest.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"

#include <atomic>
#include <fcntl.h>
#include <sys/stat.h>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>
#include <sys/statvfs.h>
#include <tbb/global_control.h>
#include <tbb/parallel_pipeline.h>
#include <tbb/task_arena.h>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace casmig::migrate {

using catalog::PackageState;
using Clock = std::chrono::steady_clock;

namespace {

// Units: a package is cut into units of at most this many files or bytes, so that one huge package
// still spreads over all cores and a unit's memory (entries only, never file contents) stays small.
constexpr size_t k_unit_files = 256;
constexpr std::uint64_t k_unit_bytes = 16ull << 20;
// Tokens in flight: enough for every worker to have a unit while the serial stages work on others;
// each unit holds at most k_unit_files open directory references, so fds stay bounded too.
unsigned tokens_for(unsigned threads) { return threads * 8; }
// A batch is published and committed when any bound is reached: less often means fewer syncfs calls,
// more often means less work redone after a crash.
constexpr auto k_batch_interval = std::chrono::milliseconds(1000);
constexpr std::uint64_t k_batch_bytes = 256ull << 20;
constexpr size_t k_batch_packages = 2000;

/// One package travelling through the pipeline.
struct Job {
    catalog::Package pkg;
    std::vector<catalog::Entry> entries;
    std::mutex mutex;
    std::atomic<bool> failed{false};
    std::string error_path, error_message;
    std::uint64_t files = 0, bytes = 0;

    void fail(const std::string& path, const std::string& message) {
        std::lock_guard lk(mutex);
        if (failed) return; // the first problem is the one reported
        error_path = path;
        error_message = message;
        failed = true;
    }
    Problem problem() const { return {util::printable(pkg.name), util::printable(error_path), error_message}; }
};

struct Unit {
    std::shared_ptr<Job> job;
    std::vector<walk::Item> items;
    bool last = false;
};
using UnitPtr = std::shared_ptr<Unit>;

/// Packages a run works on, from the catalog's packages (`all`) and the legacy directories now present.
/// Legacy directories the catalog does not know count as pending (migrate discovers them first; plan
/// sees them this way without writing).
std::vector<catalog::Package> select_packages(std::vector<catalog::Package> all, const std::vector<std::string>& legacy,
                                              const Options& opts) {
    {
        std::set<std::string> known;
        for (const auto& p : all) known.insert(p.name);
        for (const auto& d : legacy)
            if (!known.count(d)) {
                catalog::Package p;
                p.name = d;
                all.push_back(p);
            }
        std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    }
    std::set<std::string> on_disk(legacy.begin(), legacy.end());
    std::vector<catalog::Package> out;
    auto wanted = [&](const catalog::Package& p, bool named) {
        if (p.tree == catalog::TreeState::removed || !on_disk.count(p.name)) return false;
        switch (p.state) {
        case PackageState::pending:
        case PackageState::in_progress:
        case PackageState::rolled_back: return true;
        case PackageState::failed: return named || opts.retry_failed == RetryFailed::yes;
        default: return false;
        }
    };
    if (!opts.packages.empty()) {
        std::unordered_map<std::string, const catalog::Package*> by_name;
        for (const auto& p : all) by_name[p.name] = &p;
        std::set<std::string> seen;
        for (const auto& n : opts.packages) {
            auto it = by_name.find(n);
            if (it == by_name.end())
                throw util::UsageError("package " + util::printable(n) + " is not in store: no such legacy directory "
                                       "(see 'casmig status' for the packages it knows)");
            if (seen.insert(n).second && wanted(*it->second, true)) out.push_back(*it->second);
        }
    } else {
        for (const auto& p : all)
            if (wanted(p, false)) out.push_back(p);
    }
    if (opts.limit && out.size() > *opts.limit) out.resize(static_cast<size_t>(*opts.limit));
    return out;
}

enum class Mode { plan, migrate };

/// The three-stage pipeline shared by migrate and plan.
class Pipeline {
public:
    Pipeline(store::Store& store, Mode mode, const Options& opts, std::vector<catalog::Package> packages,
             const ProgressSink& progress, const ProblemSink& problems)
        : m_store(store), m_mode(mode), m_opts(opts), m_packages(std::move(packages)), m_progress(progress),
          m_problems(problems), m_limiter(opts.io_limit), m_start(Clock::now()), m_last_flush(Clock::now()) {
        m_report.phase = mode == Mode::plan ? "plan" : "migrate";
        m_report.packages_total = m_packages.size();
        if (mode == Mode::migrate) m_objects = &store.objects();
    }

    ~Pipeline() {
        if (m_committer.joinable()) {
            {
                std::lock_guard lk(m_queue_mutex);
                m_queue_closed = true;
            }
            m_queue_cv.notify_all();
            m_committer.join();
        }
    }

    void run(unsigned threads) {
        m_threads = threads;
        if (m_mode == Mode::migrate) m_committer = std::thread([this] { committer_loop(); });
        // oneTBB caps workers at cores-1 unless told otherwise; -j may ask for more threads than cores
        // (useful when file I/O blocks).
        tbb::global_control allow(tbb::global_control::max_allowed_parallelism, threads);
        tbb::task_arena arena(static_cast<int>(threads));
        arena.execute([&] {
            tbb::parallel_pipeline(
                tokens_for(threads),
                tbb::make_filter<void, UnitPtr>(tbb::filter_mode::serial_in_order,
                                                [this](tbb::flow_control& fc) { return walk_stage(fc); }) &
                    tbb::make_filter<UnitPtr, UnitPtr>(tbb::filter_mode::parallel,
                                                       [this](UnitPtr u) { return ingest_stage(std::move(u)); }) &
                    tbb::make_filter<UnitPtr, void>(tbb::filter_mode::serial_in_order,
                                                    [this](UnitPtr u) { commit_stage(std::move(u)); }));
        });
        if (m_mode == Mode::migrate) {
            flush();
            finish_committer();
        }
        m_result.seconds = std::chrono::duration<double>(Clock::now() - m_start).count();
    }

    /// Digests the catalog's objects table already lists.
    void set_cataloged(const std::vector<hash::Digest>& known) { m_cataloged.insert(known.begin(), known.end()); }

    Result& result() {
        m_result.verified = m_verified;
        return m_result;
    }
    std::uint64_t verify_failed() const { return m_verify_failed; }
    std::vector<std::int64_t>& migrated_ids() { return m_migrated_ids; }
    // plan
    std::unordered_map<hash::Digest, std::uint64_t, hash::DigestHash>& plan_digests() { return m_plan_digests; }

private:
    // ---- stage 1: walk (serial, in order)
    UnitPtr walk_stage(tbb::flow_control& fc) {
        if (!m_walker) {
            if (m_next == m_packages.size() ||
                (m_opts.time_budget && Clock::now() - m_start >= *m_opts.time_budget)) {
                if (m_next < m_packages.size()) m_result.stopped_by_budget = true;
                fc.stop();
                return nullptr;
            }
            m_job = std::make_shared<Job>();
            m_job->pkg = m_packages[m_next++];
            if (m_mode == Mode::migrate) {
                // Recorded by the committer in its next transaction: the walker never waits for the
                // catalog (the committer holds it for a whole batch).
                std::lock_guard lk(m_started_mutex);
                m_started.push_back(m_job->pkg.id);
            }
            try {
                m_walker = std::make_unique<walk::PackageWalker>(m_store.root_fd(), m_job->pkg.name);
            } catch (const walk::PackageError& e) {
                m_job->fail(e.path(), e.what());
                auto u = std::make_shared<Unit>();
                u->job = std::exchange(m_job, nullptr);
                u->last = true;
                return u;
            }
        }
        auto u = std::make_shared<Unit>();
        u->job = m_job;
        std::uint64_t bytes = 0;
        try {
            walk::Item it;
            while (u->items.size() < k_unit_files && bytes < k_unit_bytes) {
                if (!m_walker->next(it)) {
                    u->last = true;
                    break;
                }
                if (it.entry.type == catalog::EntryType::file) bytes += it.entry.size;
                u->items.push_back(std::move(it));
            }
        } catch (const walk::PackageError& e) {
            m_job->fail(e.path(), e.what());
            u->last = true;
        }
        if (u->last) {
            m_walker.reset();
            m_job.reset();
        }
        return u;
    }

    // ---- stage 2: ingest (parallel)
    UnitPtr ingest_stage(UnitPtr u) {
        Job& job = *u->job;
        // Pass 1 opens every file of the unit and starts its read-ahead; pass 2 reads and hashes them in
        // order. On a cold cache — the normal case for a store that is being migrated — the disk then
        // has the whole unit's reads queued at once instead of one small read per worker thread.
        // With --io-limit there is no read-ahead: it would read in bursts the limiter never sees.
        // A file pass 1 could not open is opened again in pass 2, which reports the error.
        std::vector<util::Fd> fds(u->items.size());
        if (!m_limiter.limited()) {
            // Pass 2's thread and the verify arena's may hold as many: 2 × threads holders.
            const size_t budget = read_ahead_files(2 * m_threads);
            for (size_t i = 0, opened = 0; i < u->items.size() && opened < budget; ++i) {
                const auto& it = u->items[i];
                if (it.entry.type != catalog::EntryType::file) continue;
                fds[i] = try_open_item(it);
                if (!fds[i]) continue;
                prefetch(fds[i].get(), it.entry.size);
                ++opened;
            }
        }
        for (size_t i = 0; i < u->items.size(); ++i) {
            auto& it = u->items[i];
            if (job.failed) break; // the package is lost for this run: do not read the rest of it
            if (it.entry.type != catalog::EntryType::file) continue;
            try {
                if (!fds[i]) fds[i] = open_item(it);
                auto r = ingest_open(it, std::move(fds[i]), m_objects,
                                     m_mode == Mode::migrate ? StoreObject::yes : StoreObject::no,
                                     m_limiter.limited() ? &m_limiter : nullptr);
                it.entry.digest = r.digest;
                it.entry.size = r.size;
                it.entry.xattrs = std::move(r.xattrs);
                if (r.new_object) {
                    m_new_objects.fetch_add(1, std::memory_order_relaxed);
                    m_new_bytes.fetch_add(r.size, std::memory_order_relaxed);
                }
            } catch (const walk::PackageError& e) {
                job.fail(e.path(), e.what());
            }
        }
        for (auto& it : u->items) it.parent.reset(); // release the directory fds as early as possible
        return u;
    }

    // ---- stage 3: commit (serial, in order)
    void commit_stage(UnitPtr u) {
        Job& job = *u->job;
        for (auto& it : u->items) {
            if (it.entry.type == catalog::EntryType::file) {
                ++job.files;
                job.bytes += it.entry.size;
                ++m_report.files_done;
                m_report.bytes_done += it.entry.size;
                if (m_mode == Mode::plan && it.entry.digest && !job.failed) m_unit_digests.push_back({*it.entry.digest, it.entry.size});
            }
            if (m_mode == Mode::migrate) job.entries.push_back(std::move(it.entry));
        }
        if (m_mode == Mode::plan && !job.failed) {
            for (auto& [d, s] : m_unit_digests) m_job_digests.push_back({d, s});
        }
        m_unit_digests.clear();
        if (!u->last) {
            report();
            return;
        }
        ++m_report.packages_done;
        ++m_result.packages;
        if (m_mode == Mode::plan) {
            if (job.failed) {
                ++m_result.failed;
                problem(job.problem());
            } else {
                m_result.files += job.files;
                m_result.bytes += job.bytes;
                for (auto& [d, s] : m_job_digests) m_plan_digests.emplace(d, s);
            }
            m_job_digests.clear();
            report();
            return;
        }
        m_batch.push_back(u->job);
        m_batch_bytes += job.bytes;
        report();
        if (m_batch.size() >= k_batch_packages || m_batch_bytes >= k_batch_bytes ||
            Clock::now() - m_last_flush >= k_batch_interval)
            flush();
    }

    /// Hands the finished packages to the committer thread, so that the pipeline keeps reading and
    /// hashing while the batch is made durable (syncfs waits for the disk) and recorded.
    void flush() {
        m_last_flush = Clock::now();
        if (m_batch.empty()) return;
        std::unique_lock lk(m_queue_mutex);
        // At most two batches wait: bounded memory, and back-pressure when the disk is the bottleneck.
        m_queue_cv.wait(lk, [&] { return m_queue.size() < 2 || m_committer_error; });
        if (m_committer_error) std::rethrow_exception(m_committer_error);
        m_queue.push_back(std::move(m_batch));
        m_batch.clear();
        m_batch_bytes = 0;
        lk.unlock();
        m_queue_cv.notify_all();
    }

    void finish_committer() {
        {
            std::lock_guard lk(m_queue_mutex);
            m_queue_closed = true;
        }
        m_queue_cv.notify_all();
        m_committer.join();
        if (m_committer_error) std::rethrow_exception(m_committer_error);
    }

    void committer_loop() {
        for (;;) {
            std::vector<std::shared_ptr<Job>> batch;
            {
                std::unique_lock lk(m_queue_mutex);
                m_queue_cv.wait(lk, [&] { return !m_queue.empty() || m_queue_closed; });
                if (m_queue.empty()) return;
                batch = std::move(m_queue.front());
                m_queue.pop_front();
            }
            m_queue_cv.notify_all();
            try {
                commit_batch(batch);
                // Verify what was just committed on this thread, while the pipeline keeps the cores
                // busy with the next packages: verify fills the time the pipeline waits for I/O.
                if (m_opts.verify == Verify::yes) verify_batch(batch);
            } catch (...) {
                std::lock_guard lk(m_queue_mutex);
                m_committer_error = std::current_exception();
                m_queue.clear();
                m_queue_cv.notify_all();
                return;
            }
        }
    }

    void verify_batch(const std::vector<std::shared_ptr<Job>>& batch) {
        std::vector<catalog::Package> pkgs;
        for (const auto& jp : batch) {
            if (jp->failed) continue;
            catalog::Package p = jp->pkg;
            p.state = PackageState::migrated;
            p.has_manifest = true;
            pkgs.push_back(std::move(p));
        }
        // Its own task arena with every thread: oneTBB shares the workers between this arena and the
        // pipeline's, so verification takes the cores the pipeline leaves idle while it waits for the
        // disk, and all of them once the pipeline is done (no single-threaded tail).
        if (pkgs.empty()) return;
        verify::Options vo;
        vo.threads = m_threads;
        vo.db_mutex = &m_db_mutex;
        auto vr = verify::verify_packages(m_store, pkgs, vo, nullptr, [this](const Problem& p) { problem(p); });
        // Recorded verified: from here readers use these packages' manifests and objects.
        io::crash_point("migrate.verified");
        m_verified += vr.ok;
        m_verify_failed += vr.mismatched;
    }

    /// Objects durable first, then the catalog rows that refer to them (see cas/object_store.hpp).
    void commit_batch(std::vector<std::shared_ptr<Job>>& batch) {
        m_store.objects().publish();
        std::lock_guard lk(m_db_mutex);
        auto& cat = m_store.catalog();
        catalog::Transaction tx(cat.db());
        {
            std::vector<std::int64_t> started;
            {
                std::lock_guard slk(m_started_mutex);
                started.swap(m_started);
            }
            // Packages the walker began; those of this batch get their final state below.
            for (auto id : started) cat.set_state(id, PackageState::in_progress);
        }
        bool any_migrated = false;
        std::unordered_set<hash::Digest, hash::DigestHash> added; // to m_cataloged once committed
        for (auto& jp : batch) {
            Job& job = *jp;
            std::string pid = util::printable(job.pkg.name);
            const char* from = catalog::to_string(job.pkg.state);
            if (job.failed) {
                cat.clear_manifest(job.pkg.id); // no stale or half manifest survives a failed run
                std::string msg = job.problem().line();
                cat.set_state(job.pkg.id, PackageState::failed, msg);
                cat.journal("migrate", pid, from, "failed", msg);
                ++m_result.failed;
                continue;
            }
            cat.put_manifest(job.pkg.id, job.entries);
            for (const auto& e : job.entries)
                if (e.type == catalog::EntryType::file && e.digest && !m_cataloged.count(*e.digest) &&
                    added.insert(*e.digest).second)
                    cat.add_object({*e.digest, static_cast<std::int64_t>(e.size), static_cast<std::int64_t>(e.size)});
            cat.set_state(job.pkg.id, PackageState::migrated);
            cat.journal("migrate", pid, from, "migrated",
                        std::to_string(job.files) + " files, " + std::to_string(job.bytes) + " bytes");
            m_migrated_ids.push_back(job.pkg.id);
            ++m_result.migrated;
            m_result.files += job.files;
            m_result.bytes += job.bytes;
            any_migrated = true;
        }
        if (any_migrated && cat.mode() == catalog::StoreMode::legacy) {
            cat.set_mode(catalog::StoreMode::dual);
            cat.journal("migrate", "", "legacy", "dual", "store mode");
        }
        tx.commit();
        io::crash_point("migrate.committed");
        m_cataloged.merge(added);
        for (auto& jp : batch)
            if (jp->failed) problem(jp->problem());
        m_result.new_objects = m_new_objects.load();
        m_result.new_object_bytes = m_new_bytes.load();
    }

    // The sinks are called from the commit stage and the committer thread: one at a time.
    void report() {
        std::lock_guard lk(m_sink_mutex);
        if (m_progress) m_progress(m_report);
    }
    void problem(const Problem& p) {
        std::lock_guard lk(m_sink_mutex);
        if (m_problems) m_problems(p);
    }

    store::Store& m_store;
    Mode m_mode;
    const Options& m_opts;
    std::vector<catalog::Package> m_packages;
    const ProgressSink& m_progress;
    const ProblemSink& m_problems;
    util::RateLimiter m_limiter;
    cas::ObjectStore* m_objects = nullptr;
    Clock::time_point m_start, m_last_flush;
    std::mutex m_db_mutex;
    // walk stage
    size_t m_next = 0;
    std::unique_ptr<walk::PackageWalker> m_walker;
    std::shared_ptr<Job> m_job;
    // ingest stage
    std::atomic<std::uint64_t> m_new_objects{0}, m_new_bytes{0};
    // commit stage
    std::vector<std::shared_ptr<Job>> m_batch;
    std::uint64_t m_batch_bytes = 0;
    // committer thread
    std::thread m_committer;
    std::mutex m_queue_mutex, m_sink_mutex;
    std::condition_variable m_queue_cv;
    std::deque<std::vector<std::shared_ptr<Job>>> m_queue;
    bool m_queue_closed = false;
    std::uint64_t m_verified = 0, m_verify_failed = 0;
    std::exception_ptr m_committer_error;
    std::vector<std::int64_t> m_migrated_ids;
    unsigned m_threads = 1;
    std::mutex m_started_mutex;
    std::vector<std::int64_t> m_started;                            // walked, not yet recorded as in_progress
    std::unordered_set<hash::Digest, hash::DigestHash> m_cataloged; // rows in objects (skip INSERT OR IGNORE)
    Progress m_report;
    Result m_result;
    std::vector<std::pair<hash::Digest, std::uint64_t>> m_unit_digests, m_job_digests;
    std::unordered_map<hash::Digest, std::uint64_t, hash::DigestHash> m_plan_digests;
};

} // namespace

Result migrate(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems) {
    const auto started = Clock::now();
    util::raise_fd_limit();
    store.discover();
    auto& cat = store.catalog();
    auto selected = select_packages(cat.packages(), store.legacy_dirs(), opts);
    std::vector<hash::Digest> known;
    for (const auto& o : cat.objects()) known.push_back(o.digest);
    Pipeline p(store, Mode::migrate, opts, std::move(selected), progress, problems);
    p.set_cataloged(known);
    store.objects().trust_catalog(std::move(known));
    p.run(util::thread_count(opts.threads));
    Result r = p.result();
    r.failed += p.verify_failed();
    if (opts.verify == Verify::yes) {
        // This run's packages, and any a killed run left migrated but unverified.
        std::vector<catalog::Package> todo;
        for (const auto& pk : cat.packages())
            if (pk.state == PackageState::migrated && pk.tree != catalog::TreeState::removed) todo.push_back(pk);
        if (!todo.empty()) {
            verify::Options vo;
            vo.threads = opts.threads;
            auto vr = verify::verify_packages(store, todo, vo, progress, problems);
            r.verified += vr.ok;
            r.failed += vr.mismatched;
        }
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return r;
}

PlanResult plan(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems) {
    util::raise_fd_limit();
    std::unique_ptr<catalog::Catalog> cat;
    if (store.has_catalog()) cat = std::make_unique<catalog::Catalog>(store.db_path(), catalog::OpenMode::read_only);
    auto selected = select_packages(cat ? cat->packages() : std::vector<catalog::Package>{}, store.legacy_dirs(), opts);
    Pipeline p(store, Mode::plan, opts, std::move(selected), progress, problems);
    p.run(util::thread_count(opts.threads));
    PlanResult r;
    r.packages = p.result().packages;
    r.failed = p.result().failed;
    r.files = p.result().files;
    r.bytes = p.result().bytes;
    // Contents already under objects/ cost nothing (plan writes nothing, so it only looks).
    util::Fd objects(::open(store.objects_dir().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    for (const auto& [d, s] : p.plan_digests()) {
        struct stat st {};
        if (objects && ::fstatat(objects.get(), cas::object_relpath(d).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) continue;
        r.unique_bytes += s;
        ++r.unique_objects;
    }
    struct statvfs vfs {};
    if (::statvfs(store.root().c_str(), &vfs) == 0) r.free_bytes = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    // Objects are rounded up to the filesystem block; the catalog needs about 200 bytes per entry.
    std::uint64_t block = vfs.f_frsize ? vfs.f_frsize : 4096;
    std::uint64_t padded = r.unique_bytes + r.unique_objects * (block / 2);
    r.needed_bytes = padded + r.files * 200;
    return r;
}

} // namespace casmig::migrate
