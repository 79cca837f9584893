#include "casmig/migrate/pipeline.hpp"

#include "casmig/catalog/sqlite.hpp"
#include "casmig/manifest/manifest.hpp"
#include "casmig/ingest/ingest.hpp"
#include "casmig/migrate/store_mode.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/util/threads.hpp"
#include "casmig/verify/verify.hpp"

#include <atomic>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <cstring>
#include <linux/magic.h>
#include <condition_variable>
#include <deque>
#include <map>
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
// a unit's items keep at most dir_refs_per_holder(tokens) (at least one) directories open, so under a
// low open-file limit the tokens shrink too, to what the directory budget (dir_refs_per_holder(1))
// allows, and never below one per thread.
unsigned tokens_for(unsigned threads) {
    return static_cast<unsigned>(std::min<size_t>(threads * 8, std::max<size_t>(threads, ingest::dir_refs_per_holder(1))));
}
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
    std::atomic<bool> no_space{false}; // the disk filled up while staging it: neither migrated nor failed
    std::string error_path, error_message;
    std::uint64_t files = 0, bytes = 0;
    std::optional<hash::Digest> manifest_object; // its manifest in packages/ (commit_batch)
    bool keep_manifest = false;                   // failed after cutover: the old manifest stays
    // Files with several links (st_nlink > 1), by inode: st_nlink and the indices of their entries.
    struct Inode {
        nlink_t nlink = 0;
        std::vector<size_t> entries;
    };
    std::map<std::pair<dev_t, ino_t>, Inode> inodes;
    // The regular files ingest hashed that verify may prove by identity (Pipeline::m_racy_before_ns).
    std::vector<std::pair<std::string, verify::FileIdentity>> identities;

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

/// ENOSPC or EDQUOT from a system call, or SQLITE_FULL from the catalog: the disk (or quota) is full.
bool is_disk_full(const std::exception& e) {
    if (auto* se = dynamic_cast<const util::SystemError*>(&e)) return se->code() == ENOSPC || se->code() == EDQUOT;
    if (auto* de = dynamic_cast<const catalog::DbError*>(&e)) return (de->code() & 0xff) == SQLITE_FULL;
    return false;
}

/// Room kept for the catalog's write-ahead log, which grows by whole pages at every commit until SQLite
/// checkpoints it (at 1,000 pages, 4 MiB): without it, a selection that fits to the last byte leaves no
/// room to record that it is migrated and verified.
constexpr std::uint64_t k_catalog_reserve = 1ull << 20;

/// Bytes a migration needs beyond what exists: objects rounded up to the filesystem block (half a block
/// on average), about 200 bytes of catalog per file, and k_catalog_reserve. plan and the preflight use
/// this one formula.
std::uint64_t bytes_needed(std::uint64_t unique_bytes, std::uint64_t unique_objects, std::uint64_t files,
                           std::uint64_t block) {
    return unique_bytes + unique_objects * (block / 2) + files * 200 + (files ? k_catalog_reserve : 0);
}

struct FsSpace {
    std::uint64_t free = 0, block = 4096;
    std::uint64_t used = 0, used_inodes = 0; // of the whole filesystem
    bool known = false; // statvfs worked
};
FsSpace fs_space(const std::string& path) {
    FsSpace f;
    struct statvfs vfs {};
    if (::statvfs(path.c_str(), &vfs) == 0) {
        f.free = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
        if (vfs.f_frsize) f.block = vfs.f_frsize;
        f.used = static_cast<std::uint64_t>(vfs.f_blocks - std::min(vfs.f_blocks, vfs.f_bfree)) * vfs.f_frsize;
        f.used_inodes = static_cast<std::uint64_t>(vfs.f_files - std::min(vfs.f_files, vfs.f_ffree));
        f.known = true;
    }
    return f;
}

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
                                       "(casmig list shows the packages it knows)");
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
        else m_objects_dir = util::Fd(::open(store.objects_dir().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        m_block = fs_space(store.root()).block;
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
        if (m_verifier.joinable()) {
            {
                std::lock_guard lk(m_vqueue_mutex);
                m_vqueue_closed = true;
            }
            m_vqueue_cv.notify_all();
            m_verifier.join();
        }
    }

    void run(unsigned threads) {
        m_threads = threads;
        if (m_mode == Mode::migrate) start_clock();
        m_unit_dirs = ingest::dir_refs_per_holder(tokens_for(threads));
        if (m_mode == Mode::migrate) m_committer = std::thread([this] { committer_loop(); });
        if (m_mode == Mode::migrate && m_opts.verify == Verify::yes) m_verifier = std::thread([this] { verifier_loop(); });
        // oneTBB caps workers at cores-1 unless told otherwise; -j may ask for more threads than cores
        // (useful when file I/O blocks).
        tbb::global_control allow(tbb::global_control::max_allowed_parallelism, threads);
        tbb::task_arena arena(static_cast<int>(threads));
        arena.execute([&] {
            // No exception leaves a filter: oneTBB cancels a pipeline whose filter throws and does not
            // destroy the items then in flight (each holds directory fds and a package's entries). The
            // first error is kept, the walk stops, the items drain, and the error is rethrown below.
            tbb::parallel_pipeline(
                tokens_for(threads),
                tbb::make_filter<void, UnitPtr>(tbb::filter_mode::serial_in_order,
                                                [this](tbb::flow_control& fc) -> UnitPtr {
                                                    if (pipeline_failed()) {
                                                        fc.stop();
                                                        return nullptr;
                                                    }
                                                    try {
                                                        return walk_stage(fc);
                                                    } catch (...) {
                                                        note_pipeline_error();
                                                        fc.stop();
                                                        return nullptr;
                                                    }
                                                }) &
                    tbb::make_filter<UnitPtr, UnitPtr>(tbb::filter_mode::parallel,
                                                       [this](UnitPtr u) -> UnitPtr {
                                                           if (!u || pipeline_failed()) return nullptr;
                                                           try {
                                                               return ingest_stage(std::move(u));
                                                           } catch (...) {
                                                               note_pipeline_error();
                                                               return nullptr;
                                                           }
                                                       }) &
                    tbb::make_filter<UnitPtr, void>(tbb::filter_mode::serial_in_order, [this](UnitPtr u) {
                        if (!u || pipeline_failed()) return;
                        try {
                            commit_stage(std::move(u));
                        } catch (...) {
                            note_pipeline_error();
                        }
                    }));
        });
        if (m_pipeline_error) std::rethrow_exception(m_pipeline_error);
        if (m_mode == Mode::migrate) {
            if (!m_disk_full) flush();
            finish_committer();
            if (m_disk_full) {
                for (size_t i = m_next; i < m_packages.size(); ++i) m_unfinished.push_back(m_packages[i]);
                commit_held();
            }
        }
        m_result.seconds = std::chrono::duration<double>(Clock::now() - m_start).count();
    }

    using DigestSet = std::unordered_set<hash::Digest, hash::DigestHash>;

    /// The disk filled up (ENOSPC, EDQUOT, SQLITE_FULL) during the run. The run stopped starting packages,
    /// deleted its staged files that no finished package needs, and committed the finished packages.
    bool disk_full() const { return m_disk_full; }
    /// The first disk-full error, e.g. "write failed: temp/w0/tmp-casmig-…: No space left on device".
    const std::string& disk_full_error() const { return m_disk_full_error; }
    /// Publishing or committing failed on a full disk: this process's view of the objects is not to
    /// be trusted for another pipeline (see commit_held()).
    bool commit_failed() const { return m_commit_failed; }
    /// Packages of the selection this run neither migrated nor failed (disk full), in selection order.
    std::vector<catalog::Package> unfinished() const {
        std::vector<catalog::Package> out = m_unfinished;
        std::unordered_map<std::string, size_t> order;
        for (size_t i = 0; i < m_packages.size(); ++i) order.emplace(m_packages[i].name, i);
        std::sort(out.begin(), out.end(), [&](const auto& a, const auto& b) { return order[a.name] < order[b.name]; });
        return out;
    }
    /// plan: for each package in selection order, bytes_needed() of it and every package before it.
    const std::vector<std::uint64_t>& prefix_needed() const { return m_prefix_needed; }
    std::uint64_t unique_bytes() const { return m_unique_bytes; }
    std::uint64_t unique_objects() const { return m_unique_objects; }

    Result& result() {
        m_result.verified = m_verified;
        return m_result;
    }
    std::uint64_t verify_failed() const { return m_verify_failed; }
    std::vector<std::int64_t>& migrated_ids() { return m_migrated_ids; }

private:
    /// Proof by identity (verify::Options::known) only where a file's ctime is the kernel's own, fresh
    /// answer: local filesystems. NFS, CIFS and FUSE may answer lstat from a cache, and some FUSE
    /// filesystems report ctime as mtime; overlayfs mixes devices. Everything else is read again.
    static bool local_clock_fs(const struct statfs& sf) {
        switch (static_cast<unsigned long>(sf.f_type)) {
        case EXT4_SUPER_MAGIC: // ext2, ext3 and ext4 share it
        case XFS_SUPER_MAGIC:
        case BTRFS_SUPER_MAGIC:
        case TMPFS_MAGIC:
        case F2FS_SUPER_MAGIC:
        case 0x2FC12FC1: // ZFS
            return true;
        default:
            return false;
        }
    }

    /// The store filesystem's clock now: the ctime of a new temp file (and that file's device).
    /// Throws util::SystemError when no temp file can be made (a full disk).
    std::int64_t fs_clock(dev_t& dev) {
        cas::TempFile probe = m_objects->create_temp(0);
        struct stat st {};
        if (::fstat(probe.fd(), &st) != 0) util::throw_errno("cannot stat a temp file", "temp/" + probe.name());
        dev = st.st_dev;
        std::int64_t ns = verify::FileIdentity::of(st).ctime_ns;
#ifdef CASMIG_TEST_SEAMS
        // Tests: "clock-back" steps the filesystem's clock back 10 s after the run's first probe.
        if (identity_seam("clock-back") && m_clock_probes++ > 0) ns -= 10'000'000'000;
#endif
        return ns;
    }
#ifdef CASMIG_TEST_SEAMS
    /// CASMIG_IDENTITY_SEAM (test seam): "remote-fs" (the store's filesystem is not a local one),
    /// "other-dev" (the legacy files seem to be on another device than the store root),
    /// "temp-other-dev" (temp/ seems to be on another device), "clock-back".
    static bool identity_seam(const char* what) {
        const char* v = std::getenv("CASMIG_IDENTITY_SEAM");
        return v && std::strcmp(v, what) == 0;
    }
    unsigned m_clock_probes = 0;
#endif

    /// With verify on: files last changed before the earlier of the store filesystem's clock and this
    /// machine's, less the racy window, may be proven by identity — on a local filesystem, on the
    /// store root's device, with temp/ on that same device (its clock is the one read).
    void start_clock() {
        if (m_opts.verify != Verify::yes) return;
        struct stat root {};
        struct statfs sf {};
        if (::fstat(m_store.root_fd(), &root) != 0 || ::fstatfs(m_store.root_fd(), &sf) != 0) return;
        std::int64_t window = verify::k_racy_window_ns;
#ifdef CASMIG_TEST_SEAMS
        // Tests: a negative window admits files changed just before (or during) the run.
        if (const char* w = std::getenv("CASMIG_RACY_WINDOW_MS")) window = std::atoll(w) * 1'000'000;
        if (identity_seam("remote-fs")) sf.f_type = 0x6969; // NFS
#endif
        if (!local_clock_fs(sf)) return;
        try {
            dev_t dev = 0;
            const std::int64_t fs_now = fs_clock(dev);
#ifdef CASMIG_TEST_SEAMS
            if (identity_seam("temp-other-dev")) dev ^= 1;
#endif
            if (dev != root.st_dev) return;
            timespec now {};
            ::clock_gettime(CLOCK_REALTIME, &now);
            const std::int64_t here = static_cast<std::int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
            m_store_dev = root.st_dev;
#ifdef CASMIG_TEST_SEAMS
            if (identity_seam("other-dev")) m_store_dev ^= 1; // every legacy file on another device
#endif
            m_clock_start_ns = fs_now;
            m_racy_before_ns.store(std::min(fs_now, here) - window);
        } catch (const util::SystemError&) {
            // No temp file (a full disk): every file is read again; the run finds the disk full itself.
        }
    }

    /// Before each verify: a filesystem clock that went back since the run began could give a later
    /// write the very ctime a file had when ingest read it, so from then on nothing is proven by
    /// identity (every file is read, as without it).
    bool clock_still_forward() {
        if (m_racy_before_ns.load() == INT64_MIN) return false;
        try {
            dev_t dev = 0;
            if (fs_clock(dev) >= m_clock_start_ns) return true;
        } catch (const util::SystemError&) {
        }
        m_racy_before_ns.store(INT64_MIN);
        return false;
    }
    dev_t m_store_dev = 0;
    std::int64_t m_clock_start_ns = 0;
    // Nothing is proven by identity until start_clock(); read by the commit stage, lowered by the committer.
    std::atomic<std::int64_t> m_racy_before_ns{INT64_MIN};

    bool pipeline_failed() const { return m_pipeline_failed.load(std::memory_order_acquire); }
    void note_pipeline_error() {
        std::lock_guard lk(m_pipeline_error_mutex);
        if (!m_pipeline_error) m_pipeline_error = std::current_exception();
        m_pipeline_failed.store(true, std::memory_order_release);
    }
    std::mutex m_pipeline_error_mutex;
    std::exception_ptr m_pipeline_error;
    std::atomic<bool> m_pipeline_failed{false};

    // ---- stage 1: walk (serial, in order)
    UnitPtr walk_stage(tbb::flow_control& fc) {
        if (m_disk_full) {
            // Start nothing more; the package being walked cannot be finished this run.
            if (!m_walker) {
                fc.stop();
                return nullptr;
            }
            m_job->no_space = true;
            auto u = std::make_shared<Unit>();
            u->job = std::exchange(m_job, nullptr);
            u->last = true;
            m_walker.reset();
            return u;
        }
        if (!m_walker) {
            // A stop request ends a migrate like the time budget (plan, and migrate's space check,
            // always count the whole selection).
            const bool stop = m_mode == Mode::migrate && util::stop_requested();
            if (m_next == m_packages.size() || stop ||
                (m_opts.time_budget && Clock::now() - m_start >= *m_opts.time_budget)) {
                if (m_next < m_packages.size() && !stop) m_result.stopped_by_budget = true;
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
            const util::Fd* last_dir = nullptr;
            size_t dirs = 0; // distinct directories the unit's items keep open (at most m_unit_dirs)
            while (u->items.size() < k_unit_files && bytes < k_unit_bytes && dirs < m_unit_dirs) {
                if (!m_walker->next(it)) {
                    u->last = true;
                    break;
                }
                if (it.entry.type == catalog::EntryType::file) {
                    bytes += it.entry.size;
                    if (it.parent.get() != last_dir) ++dirs;
                    last_dir = it.parent.get();
                }
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
        // Pass 2's thread and the verify arena's may hold as many: 2 × threads holders.
        std::vector<util::Fd> fds = ingest::open_ahead(
            u->items.size(), m_limiter.limited() ? 0 : ingest::read_ahead_files(2 * m_threads),
            [&](size_t i) { return u->items[i].entry.type == catalog::EntryType::file ? &u->items[i] : nullptr; });
        for (size_t i = 0; i < u->items.size(); ++i) {
            auto& it = u->items[i];
            if (job.failed || job.no_space) break; // the package is lost for this run: do not read the rest of it
            if (it.entry.type != catalog::EntryType::file) continue;
            try {
                if (!fds[i]) fds[i] = ingest::open_item(it);
                auto r = ingest::ingest_open(it, std::move(fds[i]), m_objects,
                                     m_mode == Mode::migrate ? ingest::StoreObject::yes : ingest::StoreObject::no,
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
            } catch (const util::SystemError& e) {
                if (!is_disk_full(e)) throw;
                job.no_space = true; // not the package's fault: it stays pending
                note_disk_full(e);
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
            if (m_mode != Mode::migrate) continue;
            // The walk's lstat is the file's identity at the end of ingest's read (ingest proved them
            // equal). Only a file last changed well before the run began, on the store's own device
            // (one filesystem clock), may be proven by it (verify::k_racy_window_ns).
            if (it.entry.type == catalog::EntryType::file && it.st.st_dev == m_store_dev) {
                const verify::FileIdentity id = verify::FileIdentity::of(it.st);
                if (id.ctime_ns < m_racy_before_ns.load(std::memory_order_relaxed)) job.identities.emplace_back(it.entry.path, id);
            }
            if (it.entry.type == catalog::EntryType::file && it.st.st_nlink > 1) {
                auto& ino = job.inodes[{it.st.st_dev, it.st.st_ino}];
                ino.nlink = it.st.st_nlink;
                ino.entries.push_back(job.entries.size());
            }
            job.entries.push_back(std::move(it.entry));
        }
        if (u->last) mark_cross_package_links(job);
        if (m_mode == Mode::plan && !job.failed) {
            for (auto& [d, s] : m_unit_digests) m_job_digests.push_back({d, s});
        }
        m_unit_digests.clear();
        if (!u->last) {
            report();
            return;
        }
        ++m_report.packages_done;
        if (job.no_space) {
            std::lock_guard lk(m_held_mutex);
            m_unfinished.push_back(job.pkg);
            report();
            return;
        }
        ++m_result.packages;
        if (m_mode == Mode::plan) {
            if (job.failed) {
                ++m_result.failed;
                problem(job.problem());
            } else {
                m_result.files += job.files;
                m_result.bytes += job.bytes;
                // Contents already under objects/ cost nothing (plan writes nothing, so it only looks).
                for (auto& [d, s] : m_job_digests) {
                    struct stat st {};
                    if (!m_plan_digests.insert(d).second) continue;
                    if (m_objects_dir &&
                        (::fstatat(m_objects_dir.get(), cas::object_relpath(d).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 ||
                         ::fstatat(m_objects_dir.get(), cas::object_relpath(d, cas::Form::zstd).c_str(), &st,
                                   AT_SYMLINK_NOFOLLOW) == 0))
                        continue;
                    m_unique_bytes += s;
                    ++m_unique_objects;
                }
            }
            m_prefix_needed.push_back(bytes_needed(m_unique_bytes, m_unique_objects, m_result.files, m_block));
            m_job_digests.clear();
            report();
            return;
        }
        m_batch.push_back(u->job);
        m_batch_bytes += job.bytes;
        report();
        // Once the disk is full, finished packages wait for commit_held(), which frees space first.
        if (!m_disk_full && (m_batch.size() >= k_batch_packages || m_batch_bytes >= k_batch_bytes ||
                             Clock::now() - m_last_flush >= k_batch_interval))
            flush();
    }

    /// An inode with more links than the package has paths to it has names outside the package (in
    /// another package, or anywhere else): every entry of it records the inode's group
    /// (catalog::Entry::xlink), so that rollback can link it again to the same file in the other package.
    static void mark_cross_package_links(Job& job) {
        for (auto& [id, ino] : job.inodes) {
            if (ino.nlink <= ino.entries.size()) continue; // every name is in this package: link_to says it all
            const auto group = catalog::xlink_group(static_cast<std::uint64_t>(id.first), static_cast<std::uint64_t>(id.second));
            for (size_t i : ino.entries) job.entries[i].xlink = group;
        }
        job.inodes.clear();
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
        // The verifier gets the committer's last batch before its queue closes.
        if (m_verifier.joinable()) {
            {
                std::lock_guard lk(m_vqueue_mutex);
                m_vqueue_closed = true;
            }
            m_vqueue_cv.notify_all();
            m_verifier.join();
        }
        if (m_committer_error) std::rethrow_exception(m_committer_error);
        if (m_verifier_error) std::rethrow_exception(m_verifier_error);
    }

    /// Hands a committed batch to the verifier thread: the committer goes on with the next batch's
    /// publish and commit while this one is verified (verify_or_note() on the verifier thread). At most
    /// one batch waits (each holds its packages' manifests in memory: peak RSS); a verifier that failed
    /// stops the committer too.
    void to_verifier(std::vector<std::shared_ptr<Job>> batch) {
        std::unique_lock lk(m_vqueue_mutex);
        m_vqueue_cv.wait(lk, [&] { return m_vqueue.empty() || m_verifier_error; });
        if (m_verifier_error) std::rethrow_exception(m_verifier_error);
        m_vqueue.push_back(std::move(batch));
        lk.unlock();
        m_vqueue_cv.notify_all();
    }

    void verifier_loop() {
        for (;;) {
            std::vector<std::shared_ptr<Job>> batch;
            {
                std::unique_lock lk(m_vqueue_mutex);
                m_vqueue_cv.wait(lk, [&] { return !m_vqueue.empty() || m_vqueue_closed; });
                if (m_vqueue.empty()) return;
                batch = std::move(m_vqueue.front());
                m_vqueue.pop_front();
            }
            m_vqueue_cv.notify_all();
            try {
                verify_or_note(batch);
            } catch (...) {
                std::lock_guard lk(m_vqueue_mutex);
                m_verifier_error = std::current_exception();
                m_vqueue.clear();
                m_vqueue_cv.notify_all();
                return;
            }
        }
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
                // Behind (another batch waits already, or the pipeline is done and flushed its last):
                // everything queued is published and committed as one, one pair of syncfs for all.
                while (!m_queue.empty()) {
                    auto& next = m_queue.front();
                    batch.insert(batch.end(), std::make_move_iterator(next.begin()), std::make_move_iterator(next.end()));
                    m_queue.pop_front();
                }
            }
            m_queue_cv.notify_all();
            try {
                if (m_disk_full) {
                    std::lock_guard lk(m_held_mutex);
                    m_held.insert(m_held.end(), batch.begin(), batch.end());
                    continue;
                }
                if (!commit_or_hold(batch)) continue;
                // Verify what was just committed on the verifier thread, while this one publishes and
                // commits the next batch (waiting for syncfs, mostly) and the pipeline keeps the cores
                // busy with the next packages.
                if (m_opts.verify == Verify::yes) to_verifier(std::move(batch));
            } catch (...) {
                std::lock_guard lk(m_queue_mutex);
                m_committer_error = std::current_exception();
                m_queue.clear();
                m_queue_cv.notify_all();
                return;
            }
        }
    }

    void note_disk_full(const std::exception& e) {
        std::lock_guard lk(m_held_mutex);
        if (m_disk_full_error.empty()) m_disk_full_error = e.what();
        m_disk_full = true;
    }

    /// commit_batch(); on a full disk (publish or catalog commit failed), the batch's packages become
    /// unfinished and false is returned. Other errors propagate.
    bool commit_or_hold(std::vector<std::shared_ptr<Job>>& batch) {
        try {
            commit_batch(batch);
            return true;
        } catch (const std::exception& e) {
            if (!is_disk_full(e)) throw;
            note_disk_full(e);
            std::lock_guard lk(m_held_mutex);
            // publish() may have placed some objects and forgotten the rest of its batch: nothing
            // this process staged is to be trusted any more (migrate() starts no other pipeline).
            m_commit_failed = true;
            for (auto& jp : batch) m_unfinished.push_back(jp->pkg);
            return false;
        }
    }

    /// verify_batch(); a full disk (SQLITE_FULL recording `verified`) leaves the packages `migrated`,
    /// which the next migrate or verify verifies.
    void verify_or_note(const std::vector<std::shared_ptr<Job>>& batch) {
        try {
            verify_batch(batch);
        } catch (const std::exception& e) {
            if (!is_disk_full(e)) throw;
            note_disk_full(e);
        }
    }

    /// After the disk filled up: the finished packages that were not committed yet are committed, once
    /// every staged file they do not need is deleted (so that publishing and the catalog commit have
    /// room); if that fails too, every staged file is deleted. temp/ holds none of this run's files after.
    void commit_held() {
        std::vector<std::shared_ptr<Job>> jobs;
        {
            std::lock_guard lk(m_held_mutex);
            jobs = std::move(m_held);
            m_held.clear();
        }
        jobs.insert(jobs.end(), m_batch.begin(), m_batch.end());
        m_batch.clear();
        if (m_commit_failed) {
            for (auto& jp : jobs) m_unfinished.push_back(jp->pkg);
            m_objects->discard_staged(nullptr);
            return;
        }
        // Keep the staged files of the finished packages, while that leaves the catalog its reserve: a
        // package whose objects would fill the disk to the last byte could not be recorded (or verified)
        // anyway; the last ones give their room back and stay pending.
        for (;;) {
            DigestSet keep;
            for (const auto& jp : jobs)
                if (!jp->failed)
                    for (const auto& e : jp->entries)
                        if (e.digest) keep.insert(*e.digest);
            m_objects->discard_staged([&](const hash::Digest& d) { return keep.count(d) > 0; });
            const FsSpace fs = fs_space(m_store.root());
            if (jobs.empty() || !fs.known || fs.free >= k_catalog_reserve) break;
            m_unfinished.push_back(jobs.back()->pkg);
            jobs.pop_back();
        }
        io::crash_point("migrate.disk-full-discarded");
        if (jobs.empty()) return;
        if (!commit_or_hold(jobs)) {
            m_objects->discard_staged(nullptr);
            return;
        }
        if (m_opts.verify == Verify::yes) verify_or_note(jobs);
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
        verify::KnownTrees known;
        for (const auto& jp : batch)
            if (!jp->failed) known[jp->pkg.id] = verify::KnownTree{&jp->entries, &jp->identities};
        verify::Options vo;
        vo.threads = m_threads;
        vo.db_mutex = &m_db_mutex;
        vo.known = clock_still_forward() ? &known : nullptr;
        auto vr = verify::verify_packages(m_store, pkgs, vo, nullptr, [this](const Problem& p) { problem(p); });
        m_result.verify_files_read += vr.files_read;
        m_result.verify_files_by_identity += vr.files_by_identity;
        // Recorded verified: from here readers use these packages' manifests and objects.
        io::crash_point("migrate.verified");
        m_verified += vr.ok;
        m_verify_failed += vr.mismatched;
    }

    /// Objects durable first, then the catalog rows that refer to them (see cas/object_store.hpp).
    void commit_batch(std::vector<std::shared_ptr<Job>>& batch) {
        // Each package's manifest also goes into packages/ (store/packages.hpp), in canonical form:
        // staged now, placed once the objects it names are durable, durable before the catalog commit.
        auto& index = m_store.packages();
        for (auto& jp : batch) {
            if (jp->failed) continue;
            try {
                manifest::normalize(jp->entries);
                std::string enc = manifest::encode(jp->entries);
                jp->manifest_object = manifest::digest_of(enc);
                index.stage(jp->pkg.name, enc, *jp->manifest_object);
            } catch (const manifest::FormatError& e) {
                jp->fail("", e.what());
            }
        }
        cas::PublishStats published;
        std::vector<std::string> manifests_quarantined;
        try {
            // The manifests were staged before the objects' publish: its syncfs made them durable too.
            published = m_store.objects().publish();
            index.publish(&manifests_quarantined, published.synced_staged);
        } catch (...) {
            index.discard(); // nothing of this batch is recorded; its refs must not be placed later
            throw;
        }
        std::lock_guard lk(m_db_mutex);
        auto& cat = m_store.catalog();
        catalog::Transaction tx(cat.db());
        for (const auto& q : published.quarantined)
            cat.journal("migrate", "", "", "", "objects/" + cas::object_relpath(q.digest) + " " + q.why + ": moved to " + q.moved_to + ", object rewritten");
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
        const bool file_level = cat.mode() == catalog::StoreMode::file_level;
        // Each distinct content of the batch once: INSERT OR IGNORE asks the objects index, so that no
        // set of every cataloged digest is kept (memory independent of the store's size, issue 9).
        DigestSet added;
        // Counted once the transaction is committed: a commit that fails (disk full) counts nothing.
        Result counted;
        std::vector<std::int64_t> migrated_ids;
        for (auto& jp : batch) {
            Job& job = *jp;
            std::string pid = util::printable(job.pkg.name);
            const char* from = catalog::to_string(job.pkg.state);
            if (job.failed) {
                // No stale or half manifest survives a failed run, except after cutover: there the
                // manifest is the truth (its objects may be all that is left of the package) and a tree
                // that cannot be read again never replaces it.
                if (file_level && job.pkg.has_manifest) job.keep_manifest = true;
                else cat.clear_manifest(job.pkg.id);
                std::string msg = job.problem().line();
                cat.set_state(job.pkg.id, PackageState::failed, msg);
                cat.journal("migrate", pid, from, "failed", msg);
                ++counted.failed;
                continue;
            }
            cat.put_manifest(job.pkg.id, job.entries, job.manifest_object);
            for (const auto& e : job.entries)
                if (e.type == catalog::EntryType::file && e.digest && added.insert(*e.digest).second)
                    cat.add_object({*e.digest, static_cast<std::int64_t>(e.size),
                                    static_cast<std::int64_t>(m_store.objects().stored_size(*e.digest).value_or(e.size))});
            cat.set_state(job.pkg.id, PackageState::migrated);
            cat.journal("migrate", pid, from, "migrated",
                        std::to_string(job.files) + " files, " + std::to_string(job.bytes) + " bytes");
            migrated_ids.push_back(job.pkg.id);
            ++counted.migrated;
            counted.files += job.files;
            counted.bytes += job.bytes;
            any_migrated = true;
        }
        if (any_migrated && cat.mode() == catalog::StoreMode::legacy) {
            cat.set_mode(catalog::StoreMode::dual);
            cat.journal("migrate", "", "legacy", "dual", "store mode");
        }
        const bool now_dual = any_migrated && !m_recorded_dual;
        tx.commit();
        io::crash_point("migrate.committed");
        // packages/ follows the catalog: a failed package's old manifest is no longer its current one,
        // and the store mode is mirrored for rebuild-catalog.
        for (auto& jp : batch)
            if (jp->failed && !jp->keep_manifest)
                if (auto w = store::mirror_step([&] { index.drop_ref(jp->pkg.name); }))
                    problem({util::printable(jp->pkg.name), "", *w, true});
        if (now_dual) {
            if (auto w = store::mirror_step([&] { store::record_mode(index, catalog::to_string(cat.mode())); }))
                problem({"-", "packages/store", *w, true});
            m_recorded_dual = true;
        }
        for (const auto& q : manifests_quarantined) problem({"-", q, "the manifest was written again"});
        m_result.failed += counted.failed;
        m_result.migrated += counted.migrated;
        m_result.files += counted.files;
        m_result.bytes += counted.bytes;
        m_migrated_ids.insert(m_migrated_ids.end(), migrated_ids.begin(), migrated_ids.end());
        // Their rows are committed: the catalog answers for them from now on.
        m_objects->forget_cataloged(std::vector<hash::Digest>(added.begin(), added.end()));
        for (auto& jp : batch)
            if (jp->failed) problem(jp->problem());
        for (const auto& q : published.quarantined)
            problem({"-", "objects/" + cas::object_relpath(q.digest),
                     q.why + ": it was not the object; moved to " + q.moved_to + " and the object rewritten"});
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
    // verifier thread (migrate with verify on)
    std::thread m_verifier;
    std::mutex m_vqueue_mutex;
    std::condition_variable m_vqueue_cv;
    std::deque<std::vector<std::shared_ptr<Job>>> m_vqueue;
    bool m_vqueue_closed = false;
    std::exception_ptr m_verifier_error;
    std::vector<std::int64_t> m_migrated_ids;
    bool m_recorded_dual = false; // packages/store holds the mode this run set
    unsigned m_threads = 1;
    size_t m_unit_dirs = 1; // see tokens_for()
    std::mutex m_started_mutex;
    std::vector<std::int64_t> m_started;                            // walked, not yet recorded as in_progress
    Progress m_report;
    Result m_result;
    std::vector<std::pair<hash::Digest, std::uint64_t>> m_unit_digests, m_job_digests;
    // plan
    util::Fd m_objects_dir;
    DigestSet m_plan_digests;
    std::uint64_t m_unique_bytes = 0, m_unique_objects = 0, m_block = 4096;
    std::vector<std::uint64_t> m_prefix_needed;
    // disk full
    std::atomic<bool> m_disk_full{false};
    bool m_commit_failed = false;
    std::mutex m_held_mutex;
    std::string m_disk_full_error;
    std::vector<std::shared_ptr<Job>> m_held;   // finished, not committed: committed by commit_held()
    std::vector<catalog::Package> m_unfinished; // neither migrated nor failed this run
};

/// What a selection of packages needs on the store's filesystem (see space_needed() in the header).
SpaceNeed space_needed_for(store::Store& store, const std::vector<catalog::Package>& packages, const Options& opts,
                           const ProgressSink& progress) {
    FsSpace fs = fs_space(store.root());
    if (!fs.known) fs.free = UINT64_MAX; // cannot tell: never refuse for it
    SpaceNeed n;
    n.free_bytes = fs.free;
    // 0. Free: the legacy trees live on this filesystem, so their bytes and files are at most what the
    //    filesystem uses; if even that fits, so does the selection (the usual case, decided without
    //    reading one directory: walking a large store costs seconds).
    if (fs.known && bytes_needed(fs.used, fs.used_inodes, fs.used_inodes, fs.block) <= n.free_bytes) {
        n.packages_that_fit = packages.size();
        return n;
    }
    // 1. Cheap upper bound, stat only: as if every file were new content. A package that cannot be
    //    walked will fail, and costs nothing.
    std::uint64_t files = 0, bytes = 0;
    for (const auto& p : packages) {
        std::uint64_t pf = 0, pb = 0;
        try {
            walk::PackageWalker w(store.root_fd(), p.name);
            walk::Item it;
            while (w.next(it))
                if (it.entry.type == catalog::EntryType::file) {
                    ++pf;
                    pb += it.entry.size;
                }
        } catch (const walk::PackageError&) {
            continue;
        }
        files += pf;
        bytes += pb;
    }
    n.needed_bytes = bytes_needed(bytes, files, files, fs.block);
    if (n.needed_bytes <= n.free_bytes) {
        n.packages_that_fit = packages.size();
        return n;
    }
    // 2. It may not fit: hash, as plan does, to count only distinct content not yet under objects/.
    Options po = opts;
    po.time_budget.reset(); // the whole selection, or the answer is too small
    const ProblemSink quiet;   // the packages that would fail are migrate's to report
    Pipeline pl(store, Mode::plan, po, packages, progress, quiet);
    pl.run(util::thread_count(opts.threads));
    n.exact = true;
    const auto& prefix = pl.prefix_needed();
    n.needed_bytes = prefix.empty() ? 0 : prefix.back();
    n.packages_that_fit = 0;
    while (n.packages_that_fit < prefix.size() && prefix[n.packages_that_fit] <= n.free_bytes) ++n.packages_that_fit;
    return n;
}

/// After a full disk stopped the parallel run: the packages it did not finish, one at a time, each
/// only if it fits (space_needed_for() on it alone), so that one run migrates everything that fits and
/// no two packages compete for the last bytes. One that does not fit, or hits a full disk again, is
/// not started (it stays pending; its staged files are deleted).
/// Returns the packages left not started.
std::vector<catalog::Package> one_at_a_time(store::Store& store, const Options& opts, Pipeline& first, Result& r,
                                            Clock::time_point started, const ProgressSink& progress,
                                            const ProblemSink& problems) {
    auto rest = first.unfinished();
    std::vector<catalog::Package> left;
    r.disk_full = true;
    r.disk_full_error = first.disk_full_error();
    auto leave_from = [&](size_t i) {
        left.insert(left.end(), rest.begin() + static_cast<std::ptrdiff_t>(i), rest.end());
        r.not_started += rest.size() - i;
        return left;
    };
    if (first.commit_failed()) return leave_from(0);
    const unsigned threads = util::thread_count(opts.threads);
    for (size_t i = 0; i < rest.size(); ++i) {
        if (util::stop_requested()) return leave_from(i); // migrate() counts what is left
        if (opts.time_budget && Clock::now() - started >= *opts.time_budget) {
            r.stopped_by_budget = true;
            return leave_from(i);
        }
        std::vector<catalog::Package> one{rest[i]};
        if (space_needed_for(store, one, opts, progress).packages_that_fit == 0) {
            ++r.not_started;
            left.push_back(rest[i]);
            continue;
        }
        Pipeline q(store, Mode::migrate, opts, one, progress, problems);
        q.run(threads);
        const Result& qr = q.result();
        r.packages += qr.packages;
        r.migrated += qr.migrated;
        r.verified += qr.verified;
        r.verify_files_read += qr.verify_files_read;
        r.verify_files_by_identity += qr.verify_files_by_identity;
        r.failed += qr.failed + q.verify_failed();
        r.files += qr.files;
        r.bytes += qr.bytes;
        r.new_objects += qr.new_objects;
        r.new_object_bytes += qr.new_object_bytes;
        if (q.disk_full()) {
            ++r.not_started;
            left.push_back(rest[i]);
            if (q.commit_failed()) return leave_from(i + 1);
        }
    }
    return left;
}

/// Packages the disk-full run began (recorded in_progress) but left: back to the state they had, so that
/// status does not show work in progress after the run. Best effort on a full disk: in_progress is
/// taken as pending by the next run anyway.
void restore_states(catalog::Catalog& cat, const std::vector<catalog::Package>& left) {
    if (left.empty()) return;
    try {
        catalog::Transaction tx(cat.db());
        for (const auto& p : left)
            if (auto now = cat.package(p.name); now && now->state == PackageState::in_progress)
                cat.set_state(p.id, p.state, p.error);
        tx.commit();
    } catch (const std::exception& e) {
        if (!is_disk_full(e)) throw;
    }
}

/// After a stop request: what of the selection (ids) is left, from the catalog — not started (pending
/// again, or never begun) or migrated but not verified yet.
void count_left(catalog::Catalog& cat, const std::vector<std::int64_t>& ids, Result& r) {
    std::unordered_set<std::int64_t> selected(ids.begin(), ids.end());
    for (const auto& p : cat.packages()) {
        if (!selected.count(p.id)) continue;
        if (p.state == PackageState::pending || p.state == PackageState::in_progress ||
            p.state == PackageState::rolled_back)
            ++r.left;
        else if (p.state == PackageState::migrated)
            ++r.left_unverified;
    }
    r.interrupted = r.left || r.left_unverified;
}

} // namespace

SpaceNeed space_needed(store::Store& store, const Options& opts, const ProgressSink& progress) {
    std::vector<catalog::Package> known;
    // The caller's read-write catalog (it upgrades an older schema); none is created here.
    if (store.has_catalog()) known = store.catalog().packages();
    auto selected = select_packages(std::move(known), store.legacy_dirs(), opts);
    SpaceNeed n = space_needed_for(store, selected, opts, progress);
    n.packages = selected.size();
    return n;
}

Result migrate(store::Store& store, const Options& opts, const ProgressSink& progress, const ProblemSink& problems) {
    const auto started = Clock::now();
    util::raise_fd_limit();
    check_compress_option(store, opts); // a refusal leaves the store as it was
    if (opts.space_check == SpaceCheck::yes) {
        // Before discover(): a refusal leaves the catalog as it was.
        SpaceNeed n = space_needed(store, opts, progress);
        if (n.needed_bytes > n.free_bytes) {
            std::string fit = n.packages_that_fit ? ", migrate fewer packages (--limit " + std::to_string(n.packages_that_fit) +
                                                        " fits)"
                                                  : "";
            throw util::RefusedError(
                "not enough space in " + store.root() + " to migrate " + std::to_string(n.packages) + " package(s): needs " +
                util::human_bytes(static_cast<double>(n.needed_bytes)) + ", " +
                util::human_bytes(static_cast<double>(n.free_bytes)) + " free; free " +
                util::human_bytes(static_cast<double>(n.needed_bytes - n.free_bytes)) + fit +
                ", or pass --no-space-check to migrate what fits");
        }
    }
    // Migrate's commits record results whose data is already durable (objects synced before their
    // rows): a commit lost to a power cut is redone, so they need no fsync each (see RelaxedDurability).
    catalog::RelaxedDurability relaxed(store.catalog().db());
    store.discover();
    auto& cat = store.catalog();
    auto known = cat.packages();
    // Failed packages a run without --retry-failed leaves alone: said, so that "0 packages" is not
    // read as "nothing left to do".
    std::uint64_t failed_left = 0;
    if (opts.packages.empty() && opts.retry_failed == RetryFailed::no)
        for (const auto& p : known)
            if (p.state == PackageState::failed && p.tree != catalog::TreeState::removed) ++failed_left;
    auto selected = select_packages(std::move(known), store.legacy_dirs(), opts);
    std::uint64_t kept_changed = 0;
    if (!opts.packages.empty()) {
        // The package manager names a package on upgrade: one already verified is checked again, so
        // that readers never keep a manifest its legacy tree no longer matches.
        std::vector<catalog::Package> recheck;
        std::set<std::string> seen;
        for (const auto& n : opts.packages) {
            auto p = cat.package(n);
            if (p && seen.insert(n).second && p->state == PackageState::verified && p->tree != catalog::TreeState::removed)
                recheck.push_back(*p);
        }
        if (!recheck.empty()) {
            std::map<std::string, Problem> first;
            verify::Options vo;
            vo.threads = opts.threads;
            vo.record = verify::RecordState::no;
            verify::verify_packages(store, recheck, vo, nullptr, [&](const Problem& pr) { first.emplace(pr.package, pr); });
            const bool file_level = cat.mode() == catalog::StoreMode::file_level;
            for (const auto& p : recheck) {
                auto it = first.find(util::printable(p.name));
                if (it == first.end()) continue;
                const std::string what = (it->second.path.empty() ? "" : "'" + it->second.path + "' ") + it->second.message;
                if (file_level) {
                    // After cutover the manifest is what readers use: keep it, keep the tree, say so.
                    ++kept_changed;
                    if (problems)
                        problems({it->second.package, "", "its legacy tree changed after cutover (" + what +
                                                              "); the manifest is kept and cleanup keeps the tree: "
                                                              "restore the tree, or casmig remove the package and "
                                                              "install it again"});
                    continue;
                }
                catalog::Transaction tx(cat.db());
                cat.journal("migrate", it->second.package, "verified", "pending",
                            "legacy tree changed since it was verified (" + what + "): migrating it again");
                tx.commit();
                if (!opts.limit || selected.size() < *opts.limit) selected.push_back(p);
            }
        }
    }
    enable_store_mode(store, opts, selected);
    // Is a content already in the store? The catalog's objects index answers, one lookup per new
    // digest (nothing is loaded up front: a no-op migrate of a huge store costs what it touches).
    // The ingest threads ask through read-only connections of their own (WAL: readers never wait for
    // the writer), never through the writer's, whose mutex the commit stage holds for every row it
    // writes. A reader sees committed rows only; what this run placed and has not committed yet the
    // ObjectStore itself remembers until forget_cataloged(). A first migration (no object cataloged
    // yet, the store locked) skips the lookup for a content no batch of this run has committed.
    const bool nothing_cataloged = !cat.has_any_object();
    store.objects().trust_catalog([pool = std::make_shared<catalog::ReaderPool>(store.db_path())](const hash::Digest& d) {
        return pool->has_object(d);
    }, nothing_cataloged);
    std::vector<std::int64_t> selected_ids;
    for (const auto& pk : selected) selected_ids.push_back(pk.id);
    Pipeline p(store, Mode::migrate, opts, std::move(selected), progress, problems);
    p.run(util::thread_count(opts.threads));
    Result r = p.result();
    r.failed += p.verify_failed() + kept_changed;
    if (p.disk_full()) restore_states(cat, one_at_a_time(store, opts, p, r, started, progress, problems));
    if (opts.verify == Verify::yes) {
        // This run's packages, and any a killed run left migrated but unverified.
        std::vector<catalog::Package> todo;
        for (const auto& pk : cat.packages())
            if (pk.state == PackageState::migrated && pk.tree != catalog::TreeState::removed) todo.push_back(pk);
        if (!todo.empty()) {
            verify::Options vo;
            vo.threads = opts.threads;
            try {
                auto vr = verify::verify_packages(store, todo, vo, progress, problems);
                r.verified += vr.ok;
                r.failed += vr.mismatched;
                r.verify_files_read += vr.files_read;
            } catch (const std::exception& e) {
                if (!is_disk_full(e)) throw;
                // Recording `verified` needs a little catalog space: the packages stay `migrated`
                // (durable) and the next migrate or verify verifies them.
                r.disk_full = true;
                r.unverified = true;
                if (r.disk_full_error.empty()) r.disk_full_error = e.what();
            }
        }
    }
    if (util::stop_requested()) count_left(cat, selected_ids, r);
    r.failed_not_retried = failed_left;
    r.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    if (r.migrated || r.failed || r.interrupted || r.disk_full) {
        // The run's end, with its start and result, for status (lifecycle::LastRun): a run killed
        // before this row has none, and status says so. A run that did nothing writes nothing.
        const auto started_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::system_clock::now().time_since_epoch()).count() -
                                static_cast<std::int64_t>(r.seconds * 1e9);
        const std::string result = r.interrupted ? "interrupted (" + util::signal_name(util::stop_signal()) + ")"
                                   : r.disk_full ? "disk full"
                                   : r.stopped_by_budget ? "time budget reached"
                                                         : "completed";
        try {
            cat.journal("migrate", "", "", "", std::string(k_run_ended) + result + "; started_ns " + std::to_string(started_ns));
        } catch (const std::exception& e) {
            if (!is_disk_full(e)) throw; // a full disk: status then shows no end record, the data is safe
        }
    }
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
    r.unique_bytes = p.unique_bytes();
    r.unique_objects = p.unique_objects();
    r.free_bytes = fs_space(store.root()).free;
    r.needed_bytes = p.prefix_needed().empty() ? 0 : p.prefix_needed().back();
    const auto& prefix = p.prefix_needed();
    while (r.packages_that_fit < prefix.size() && prefix[r.packages_that_fit] <= r.free_bytes) ++r.packages_that_fit;
    return r;
}

} // namespace casmig::migrate
