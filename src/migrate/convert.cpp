#include "casmig/migrate/convert.hpp"

#include "casmig/catalog/sqlite.hpp"
#include "casmig/migrate/store_mode.hpp"
#include "casmig/store/packages.hpp"
#include "casmig/util/aligned_buffer.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/interrupt.hpp"
#include "casmig/util/io.hpp"
#include "casmig/util/threads.hpp"

#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <fcntl.h>
#include <sys/stat.h>
#include <tbb/parallel_for_each.h>
#include <tbb/task_arena.h>
#include <unistd.h>
#include <unordered_map>

namespace casmig::migrate {

namespace {

// Objects up to this size are read whole and compressed in one call (with the dictionary up to
// cas::k_dict_max); larger ones are streamed in chunks (memory stays one chunk per worker).
constexpr std::uint64_t k_whole = 8 << 20;
constexpr size_t k_chunk = 1 << 20;
constexpr const char* k_cursor_key = "convert";

/// The source form could not be read as the object: the object is left alone and reported.
struct SourceError {
    std::string why;
};

enum class Outcome { none, staged, kept_raw, failed };

struct Job {
    hash::Digest digest;
    cas::Form from = cas::Form::raw;
    std::optional<std::uint64_t> size; // the catalog's, when it lists the object
    bool both = false;                 // the target form is on disk too (a stopped run's, or planted)
    std::uint64_t content = 0;         // uncompressed bytes
    std::uint64_t before = 0;          // bytes of the source form on disk
    Outcome outcome = Outcome::none;
    std::string why;
};

struct Shard {
    std::vector<hash::Digest> raw, zst;
};

/// Reads up to len bytes of the source; read errors become SourceError.
size_t read_source(cas::ObjectReader& r, char* buf, size_t len) {
    try {
        return r.read(buf, len);
    } catch (const util::Error& e) {
        throw SourceError{e.what()};
    }
}

/// Reads, hashes and re-encodes one object into a temp file that is staged for publish (Outcome::staged);
/// or decides it stays as it is (kept_raw, failed). Write errors (temp/) throw.
void convert_one(cas::ObjectStore& objects, Job& j, Target target) {
    const cas::Form to = target == Target::zstd ? cas::Form::zstd : cas::Form::raw;
    try {
        std::optional<cas::ObjectReader> opened;
        try {
            opened.emplace(objects.open_file(cas::object_relpath(j.digest, j.from)));
            j.before = opened->stored_size();
            j.content = opened->content_size();
        } catch (const util::Error& e) {
            throw SourceError{e.what()};
        }
        cas::ObjectReader& r = *opened;
        if (j.size && j.content != *j.size)
            throw SourceError{"has " + std::to_string(j.content) + " bytes, the catalog says " + std::to_string(*j.size)};
        if (target == Target::zstd && j.content < cas::k_compress_min) {
            j.outcome = Outcome::kept_raw;
            return;
        }
        thread_local util::AlignedBuffer buf;
        hash::Hasher h;
        std::uint64_t total = 0;
        std::optional<cas::TempFile> out;
        auto check = [&] {
            if (total != j.content)
                throw SourceError{"changed size while being read (" + std::to_string(total) + " bytes, expected " +
                                  std::to_string(j.content) + ")"};
            auto got = h.finish();
            if (got != j.digest) throw SourceError{"content does not match its name (BLAKE3 " + got.hex() + ")"};
        };
        if (target == Target::zstd && j.content <= k_whole) {
            buf.reserve(static_cast<size_t>(j.content) + 1);
            for (;;) {
                size_t n = read_source(r, buf.data() + total, static_cast<size_t>(j.content + 1 - total));
                if (n == 0) break;
                total += n;
                if (total > j.content) break;
            }
            h.update(buf.data(), static_cast<size_t>(std::min(total, j.content)));
            check();
            out = objects.compressed_temp(std::string_view(buf.data(), static_cast<size_t>(total)));
        } else {
            buf.reserve(k_chunk);
            std::uint64_t stored = 0;
            // --compress streams through the thread's zstd context (no dictionary: the object is large);
            // --raw writes the decoded bytes, leaving holes where they are zero (as migrate does).
            cas::TempFile tmp = objects.create_temp(target == Target::raw ? j.content : 0);
            std::optional<cas::Compressor::Stream> z;
            if (target == Target::zstd) z.emplace(*objects.compressor(), j.content);
            auto sink = [&](const char* p, size_t n) {
                tmp.append(p, n);
                stored += n;
            };
            for (;;) {
                size_t n = read_source(r, buf.data(), k_chunk);
                if (n == 0) break;
                total += n;
                if (total > j.content) break; // a frame whose header lies: check() reports it
                h.update(buf.data(), n);
                if (z) z->feed(buf.data(), n, sink);
                else tmp.append_sparse(buf.data(), n);
            }
            check();
            if (z) z->finish(sink);
            if (!z || cas::worth_compressing(j.content, stored)) out = std::move(tmp);
        }
        if (!out) {
            j.outcome = Outcome::kept_raw; // not worth compressing: the raw object stays
            return;
        }
        const std::uint64_t stored = out->size();
        objects.stage_other_form(j.digest, std::move(*out), j.content, to, stored);
        j.outcome = Outcome::staged;
    } catch (const SourceError& e) {
        j.outcome = Outcome::failed;
        j.why = e.why;
    }
}

/// digest → (size, stored_size) of every catalogued object.
using Rows = std::unordered_map<hash::Digest, std::pair<std::int64_t, std::int64_t>, hash::DigestHash>;

/// The bytes the object takes on disk now: its raw form if present (readers take it first), else
/// its .zst form; nullopt if neither is there.
std::optional<std::int64_t> stored_now(const cas::ObjectStore& objects, const hash::Digest& d) {
    for (cas::Form f : {cas::Form::raw, cas::Form::zstd}) {
        struct stat st {};
        if (::fstatat(objects.dirfd(), cas::object_relpath(d, f).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            S_ISREG(st.st_mode))
            return static_cast<std::int64_t>(st.st_size);
    }
    return std::nullopt;
}

std::string hex2(unsigned shard) {
    static const char* hex = "0123456789abcdef";
    return {hex[shard >> 4], hex[shard & 15]};
}

} // namespace

ConvertResult convert(store::Store& s, const ConvertOptions& opts, const ProgressSink& progress,
                      const ProblemSink& problems) {
    const auto start = std::chrono::steady_clock::now();
    auto& cat = s.catalog();
    auto& objects = s.objects();
    const bool to_zstd = opts.target == Target::zstd;
    const cas::Form to = to_zstd ? cas::Form::zstd : cas::Form::raw;
    const cas::Form from = to_zstd ? cas::Form::raw : cas::Form::zstd;
    const std::string tag = to_zstd ? "zstd" : "raw";
    ConvertResult r;

    // 1. Intent: the mode first, so that new objects are written in the new form from now on.
    if (to_zstd) {
        auto mode = choose_compression(s, opts.level, opts.dictionary,
                                       [&] { return sample_small_objects(s, k_sample_bytes); }, "convert");
        use_compression(s, mode);
        r.compression = mode.setting();
    } else {
        if (auto mode = store::read_compression(cat)) {
            catalog::Transaction tx(cat.db());
            store::clear_compression(cat);
            cat.journal("convert", "", "", "", "store mode raw (was " + mode->setting() + ")");
            tx.commit();
            io::crash_point("convert.mode-cleared");
        }
        (void)store::mirror_step([&] { s.packages().erase_setting("compression"); });
        objects.set_compressor(nullptr);
        r.compression = "none";
    }

    // Where a stopped run of the same direction got to.
    unsigned first = 0;
    if (auto c = cat.setting(k_cursor_key); c && c->rfind(tag + ":", 0) == 0) {
        try {
            first = static_cast<unsigned>(std::min(256ul, std::stoul(c->substr(tag.size() + 1))));
        } catch (const std::exception&) {
            first = 0; // damaged: a full pass is always right
        }
    }

    Rows rows;
    for (const auto& o : cat.objects()) rows.emplace(o.digest, std::make_pair(o.size, o.stored_size));
    std::array<Shard, 256> shards;
    std::uint64_t total = 0;
    for (const auto& rel : objects.list_files()) {
        // Content objects only: "ab/<62 hex>" and "ab/<62 hex>.zst" (hard-link variants stay as they are).
        const bool zst = rel.size() == 65 + cas::k_zst_suffix.size() && rel.compare(65, std::string::npos, cas::k_zst_suffix) == 0;
        if (rel.size() != 65 && !zst) continue;
        auto d = hash::Digest::from_hex(rel.substr(0, 2) + rel.substr(3, 62));
        if (!d) continue;
        auto& sh = shards[d->raw()[0] & 0xff];
        (zst ? sh.zst : sh.raw).push_back(*d);
        ++total;
    }

    Progress report;
    report.phase = "convert";
    report.unit = "objects";
    report.packages_total = total;
    tbb::task_arena arena(static_cast<int>(util::thread_count(opts.threads)));
    auto report_object = [&](const hash::Digest& d, cas::Form f, const std::string& msg, bool warning) {
        if (problems) problems({"-", "objects/" + cas::object_relpath(d, f), msg, warning});
    };

    {
    // The per-shard commits record facts already durable on disk (a commit lost to a power cut means a
    // shard looked at again); the final commit below is a full one again.
    catalog::RelaxedDurability relaxed(cat.db());
    for (unsigned shard = first; shard < 256; ++shard) {
        if (util::stop_requested()) {
            r.interrupted = true; // between shards: everything before is recorded, the cursor stays
            r.shards_left = 256 - shard;
            break;
        }
        if (opts.time_budget && std::chrono::steady_clock::now() - start >= *opts.time_budget) {
            r.stopped_by_budget = true;
            r.shards_left = 256 - shard;
            break;
        }
        auto& sh = shards[shard];
        std::sort(sh.raw.begin(), sh.raw.end());
        std::sort(sh.zst.begin(), sh.zst.end());
        const auto& have_from = to_zstd ? sh.raw : sh.zst;
        const auto& have_to = to_zstd ? sh.zst : sh.raw;
        std::vector<Job> jobs;
        for (const auto& d : have_from) {
            Job j;
            j.digest = d;
            j.from = from;
            if (auto it = rows.find(d); it != rows.end()) j.size = static_cast<std::uint64_t>(it->second.first);
            j.both = std::binary_search(have_to.begin(), have_to.end(), d);
            jobs.push_back(std::move(j));
        }
        std::uint64_t only_to = 0;
        for (const auto& d : have_to)
            if (!std::binary_search(have_from.begin(), have_from.end(), d)) ++only_to;
        r.already += only_to;
        r.objects += jobs.size() + only_to;
        // 2. Both forms on disk (a run stopped between placing and unlinking): the target form is
        //    trusted only once proven; a bad one is moved aside and the object converted again.
        arena.execute([&] {
            tbb::parallel_for_each(jobs.begin(), jobs.end(), [&](Job& j) {
                if (!j.both) {
                    convert_one(objects, j, opts.target);
                    return;
                }
                j.why = objects.prove_form(j.digest, j.size, to);
                if (j.why.empty()) { // nothing to write: only the old form goes
                    j.outcome = Outcome::staged;
                    struct stat st {};
                    if (::fstatat(objects.dirfd(), cas::object_relpath(j.digest, j.from).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0)
                        j.before = static_cast<std::uint64_t>(st.st_size);
                }
                // else: moved aside below (one thread), then converted again
            });
        });
        bool requeue = false;
        for (auto& j : jobs) {
            if (!j.both || j.outcome == Outcome::staged) continue;
            std::string moved = objects.quarantine(cas::object_relpath(j.digest, to));
            io::crash_point("convert.quarantined");
            ++r.quarantined;
            cat.journal("convert", "", "", "", "objects/" + cas::object_relpath(j.digest, to) + " " + j.why + ": moved to " + moved);
            report_object(j.digest, to, j.why + ": not the object, moved to " + moved + "; converting again", true);
            j.both = false;
            j.why.clear();
            requeue = true;
        }
        if (requeue)
            arena.execute([&] {
                tbb::parallel_for_each(jobs.begin(), jobs.end(), [&](Job& j) {
                    if (j.outcome == Outcome::none) convert_one(objects, j, opts.target);
                });
            });
        // 3. Publish the new forms: durable, then renamed into place without replacing anything.
        if (objects.staged_count() > 0) {
            auto st = objects.publish();
            for (const auto& q : st.quarantined) {
                ++r.quarantined;
                cat.journal("convert", "", "", "", "objects/" + cas::object_relpath(q.digest, to) + " " + q.why + ": moved to " + q.moved_to);
                report_object(q.digest, to, q.why + ": not the object, moved to " + q.moved_to + " and replaced", true);
            }
        }
        io::crash_point("convert.placed");
        // 4. Prove each new form from disk, then unlink the old one.
        arena.execute([&] {
            tbb::parallel_for_each(jobs.begin(), jobs.end(), [&](Job& j) {
                if (j.outcome != Outcome::staged) return;
                j.why = objects.prove_form(j.digest, j.size ? j.size : std::optional<std::uint64_t>(j.content), to);
            });
        });
        std::vector<const Job*> done;
        for (auto& j : jobs) {
            if (j.outcome == Outcome::kept_raw) ++r.kept_raw;
            if (j.outcome == Outcome::failed) {
                ++r.failed;
                report_object(j.digest, j.from,
                              j.why + "; not converted, left in place: run casmig verify --objects (it moves a bad "
                                      "object aside and names the packages that need it)",
                              false);
            }
            if (j.outcome != Outcome::staged) continue;
            if (!j.why.empty()) {
                // The new form does not read back as the object (a zstd or memory fault): it goes aside,
                // the old form stays.
                std::string moved = objects.quarantine(cas::object_relpath(j.digest, to));
                io::crash_point("convert.quarantined");
                ++r.failed;
                report_object(j.digest, to, "new form " + j.why + ": moved to " + moved + "; the " +
                                                (to_zstd ? "raw" : ".zst") + " object is kept",
                              false);
                continue;
            }
            if (io::unlinkat(objects.dirfd(), cas::object_relpath(j.digest, j.from).c_str(), 0) != 0 && errno != ENOENT)
                util::throw_errno("cannot remove object", objects.dir() + "/" + cas::object_relpath(j.digest, j.from));
            io::crash_point("convert.unlinked");
            done.push_back(&j);
        }
        if (!done.empty()) {
            const std::string fan = objects.dir() + "/" + hex2(shard);
            util::Fd dir = util::open_dir_at(objects.dirfd(), hex2(shard), fan);
            util::fsync_fd(dir.get(), fan);
            io::crash_point("convert.unlinks-durable");
        }
        // 5. Record what is on disk now (only durable facts), and the cursor — in a shard where nothing
        //    changed, nothing (a rerun looks at it again, which costs a directory listing).
        std::vector<std::pair<hash::Digest, std::int64_t>> sizes;
        auto record = [&](const hash::Digest& d) {
            auto it = rows.find(d);
            if (it == rows.end()) return;
            auto now = stored_now(objects, d);
            if (now && *now != it->second.second) sizes.emplace_back(d, *now);
        };
        for (const auto& d : sh.raw) record(d);
        for (const auto& d : sh.zst) record(d);
        if (!sizes.empty() || !done.empty()) {
            catalog::Transaction tx(cat.db());
            for (const auto& [d, n] : sizes) {
                cat.set_stored_size(d, n);
                rows[d].second = n;
            }
            cat.set_setting(k_cursor_key, tag + ":" + std::to_string(shard + 1));
            tx.commit();
            io::crash_point("convert.recorded");
        }
        for (const Job* j : done) {
            ++r.converted;
            r.bytes_before += j->before;
            r.bytes_after += static_cast<std::uint64_t>(stored_now(objects, j->digest).value_or(0));
        }
        report.packages_done += sh.raw.size() + sh.zst.size();
        report.files_done = r.converted;
        if (progress) progress(report);
    }
    }
    {
        catalog::Transaction tx(cat.db());
        if (!r.stopped_by_budget && !r.interrupted) cat.delete_setting(k_cursor_key);
        cat.journal("convert", "", "", "",
                    std::string(r.stopped_by_budget ? "time budget reached, " : r.interrupted ? "interrupted, " : "") +
                        "to " + r.compression + ": " +
                        std::to_string(r.converted) + " converted (" + std::to_string(r.bytes_before) +
                        " -> " + std::to_string(r.bytes_after) + " bytes), " + std::to_string(r.kept_raw) + " kept raw, " +
                        std::to_string(r.failed) + " failed");
        tx.commit();
    }
    io::crash_point("convert.done");
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return r;
}

} // namespace casmig::migrate
