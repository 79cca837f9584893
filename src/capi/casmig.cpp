// The C library (include/casmig/casmig.h): a thin shell over the same core as the CLI. Every entry
// point catches everything: no C++ exception crosses the ABI; the code says what kind of failure it
// was (the CLI's exit codes) and casmig_last_error() holds its one line.
#include "casmig/casmig.h"

#include "casmig/cas/object_store.hpp"
#include "casmig/catalog/catalog.hpp"
#include "casmig/hash/blake3.hpp"
#include "casmig/lifecycle/lifecycle.hpp"
#include "casmig/migrate/pipeline.hpp"
#include "casmig/store/store.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"
#include "casmig/util/parse.hpp"
#include "casmig/verify/verify.hpp"
#include "casmig/walk/walker.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <new>
#include <set>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

using namespace casmig;

struct casmig_store {
    std::unique_ptr<store::Store> store;
};

namespace {

thread_local std::string t_error;

int fail(int code, const std::string& message) {
    t_error = message;
    return code;
}

/// Runs f, turning every exception into a code and a message.
template <class F>
int guarded(F&& f) noexcept {
    try {
        t_error.clear();
        return f();
    } catch (const util::UsageError& e) {
        return fail(CASMIG_USAGE, e.what());
    } catch (const util::RefusedError& e) {
        return fail(CASMIG_REFUSED, e.what());
    } catch (const util::BusyError& e) {
        return fail(CASMIG_BUSY, e.what());
    } catch (const std::bad_alloc&) {
        return fail(CASMIG_FAILED, "out of memory");
    } catch (const std::exception& e) {
        return fail(CASMIG_FAILED, e.what());
    } catch (...) {
        return fail(CASMIG_FAILED, "unknown error");
    }
}

std::vector<std::string> names_of(const char* const* packages, size_t n) {
    std::vector<std::string> out;
    if (n && !packages) throw util::UsageError("packages is NULL but n is " + std::to_string(n));
    for (size_t i = 0; i < n; ++i) {
        if (!packages[i]) throw util::UsageError("package " + std::to_string(i) + " is NULL");
        out.emplace_back(packages[i]);
    }
    return out;
}

ProblemSink problem_sink(casmig_problem_fn fn, void* user, std::uint64_t* failures) {
    return [fn, user, failures](const Problem& p) {
        if (!p.warning && failures) ++*failures;
        if (fn) fn(p.package.c_str(), p.path.c_str(), p.message.c_str(), p.warning ? 1 : 0, user);
    };
}

store::Store& store_of(casmig_store* s) {
    if (!s || !s->store) throw util::UsageError("store handle is NULL");
    return *s->store;
}

/// Splits a package-relative path into its components; refuses anything but plain names.
std::vector<std::string> components(const std::string& path) {
    std::vector<std::string> out;
    size_t pos = 0;
    for (;;) {
        size_t slash = path.find('/', pos);
        std::string c = path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
        if (c.empty() || c == "." || c == ".." || c.find('\0') != std::string::npos)
            throw util::UsageError("path " + util::printable(path) + " is not a plain relative path inside a package");
        out.push_back(std::move(c));
        if (slash == std::string::npos) return out;
        pos = slash + 1;
    }
}

/// The legacy file at package/path, opened without following any symlink, checked to be regular.
util::Fd open_legacy(store::Store& s, const std::string& package, const std::string& path) {
    const std::string display = s.root() + "/" + util::printable(package) + "/" + util::printable(path);
    components(path);
    util::Fd pkg(::openat(s.root_fd(), package.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!pkg && (errno == ENOENT || errno == ENOTDIR || errno == ELOOP))
        throw util::UsageError("package " + util::printable(package) + " is not in store " + s.root() +
                               ": check the id with casmig list");
    if (!pkg) util::throw_errno("cannot open the legacy tree of package " + util::printable(package), s.root());
    util::Fd fd;
    try {
        fd = util::open_beneath(pkg.get(), path, display);
    } catch (const util::SystemError& e) {
        if (e.code() == ENOENT || e.code() == ENOTDIR || e.code() == ELOOP)
            throw util::UsageError(display + " is not a file of package " + util::printable(package));
        throw;
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) util::throw_errno("cannot stat", display);
    if (!S_ISREG(st.st_mode)) throw util::UsageError(display + " is not a regular file");
    int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags >= 0) ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
    return fd;
}

/// The object's content, proven: a raw object is hashed through the fd handed out (then rewound); a
/// compressed one is decompressed into a sealed anonymous file while hashed. Never a byte the name
/// does not vouch for.
util::Fd open_object(store::Store& s, const manifest::Entry& e, const std::string& display) {
    cas::ObjectStore objects(s.objects_dir(), s.temp_dir());
    cas::ObjectReader r = objects.open_content(*e.digest);
    const std::string bad = "object " + e.digest->hex() + " of " + display +
                            " does not match its name: run casmig verify --objects, which names and repairs it";
    if (r.form() == cas::Form::raw) {
        std::uint64_t n = 0;
        if (cas::hash_content(r, &n) != *e.digest || n != e.size) throw util::Error(bad);
        util::Fd fd(::openat(objects.dirfd(), cas::object_relpath(*e.digest).c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
        if (!fd) util::throw_errno("cannot open object for", display);
        // The file proven above, not one put at the name since.
        struct stat a {}, b {};
        if (::fstat(fd.get(), &a) != 0 || ::fstat(r.fd(), &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)
            throw util::Error("object " + e.digest->hex() + " of " + display + " changed while it was opened: try again");
        return fd;
    }
    util::Fd mem(::memfd_create("casmig-object", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!mem) util::throw_errno("cannot create a memory file for", display);
    hash::Hasher h;
    std::vector<char> buf(1 << 20);
    std::uint64_t total = 0;
    for (;;) {
        size_t n = r.read(buf.data(), buf.size());
        if (n == 0) break;
        h.update(buf.data(), n);
        for (size_t off = 0; off < n;) {
            ssize_t w = ::write(mem.get(), buf.data() + off, n - off);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) util::throw_errno("cannot write a memory file for", display);
            off += static_cast<size_t>(w);
        }
        total += n;
    }
    if (h.finish() != *e.digest || total != e.size) throw util::Error(bad);
    ::fcntl(mem.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
    // Handed out read-only: a new open file description of the same memory file.
    util::Fd ro(::open(("/proc/self/fd/" + std::to_string(mem.get())).c_str(), O_RDONLY | O_CLOEXEC));
    if (!ro) util::throw_errno("cannot reopen a memory file for", display);
    return ro;
}

} // namespace

extern "C" {

const char* casmig_version(void) { return CASMIG_VERSION; }

const char* casmig_last_error(void) { return t_error.c_str(); }

int casmig_open(const char* root, const char* db_path, casmig_store** out) {
    if (out) *out = nullptr;
    return guarded([&]() -> int {
        if (!out) throw util::UsageError("out is NULL");
        if (!root || !*root) throw util::UsageError("store root is empty: pass the store's directory");
        auto h = std::make_unique<casmig_store>();
        h->store = std::make_unique<store::Store>(root, db_path ? db_path : "");
        *out = h.release();
        return CASMIG_OK;
    });
}

void casmig_close(casmig_store* store) { delete store; }

int casmig_set_lock_wait(casmig_store* handle, uint64_t milliseconds) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        // Beyond ten years (UINT64_MAX included) is ten years: a wait that long is "wait for it".
        const auto ms = std::min<uint64_t>(milliseconds, static_cast<uint64_t>(util::k_max_duration.count()));
        s.set_lock_wait({std::chrono::milliseconds(static_cast<std::int64_t>(ms)), nullptr});
        return CASMIG_OK;
    });
}

int casmig_migrate(casmig_store* handle, const char* const* packages, size_t n, casmig_progress_fn progress,
                   casmig_problem_fn problem, void* user, casmig_migrate_result* out) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        std::uint64_t failures = 0;
        auto sink = problem_sink(problem, user, &failures);
        migrate::Options o;
        o.packages = names_of(packages, n);
        auto lock = lifecycle::lock_store(s, "migrate", store::Purpose::write, sink,
                                          [&](const std::string& w) { sink({"-", "", w, true}); });
        ProgressSink ps;
        if (progress)
            ps = [progress, user](const Progress& p) {
                casmig_progress c{p.phase.c_str(), p.packages_done, p.packages_total, p.files_done, p.bytes_done, p.bytes_total};
                progress(&c, user);
            };
        auto r = migrate::migrate(s, o, ps, sink);
        if (out)
            *out = {r.packages, r.migrated, r.verified, r.failed, r.files, r.bytes, r.new_objects, r.new_object_bytes};
        const bool left = r.disk_full && (r.not_started || r.unverified);
        if (left) return fail(CASMIG_FAILED, "disk full in " + s.root() + " (" + r.disk_full_error + "): free space and call again");
        if (r.failed || failures)
            return fail(CASMIG_FAILED, std::to_string(r.failed) + " package(s) failed in store " + s.root() +
                                           " (each named through the problem callback)");
        return CASMIG_OK;
    });
}

int casmig_verify(casmig_store* handle, const char* const* packages, size_t n, casmig_problem_fn problem, void* user,
                  casmig_verify_result* out) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        std::uint64_t failures = 0;
        auto sink = problem_sink(problem, user, &failures);
        auto lock = lifecycle::lock_store(s, "verify", store::Purpose::write, sink,
                                          [&](const std::string& w) { sink({"-", "", w, true}); });
        catalog::RelaxedDurability relaxed(s.catalog().db()); // verify records results, no intent
        s.discover();
        auto& cat = s.catalog();
        std::vector<catalog::Package> todo;
        for (const auto& name : names_of(packages, n)) {
            auto p = cat.package(name);
            if (!p) throw util::UsageError("package " + util::printable(name) + " is not in store " + s.root());
            todo.push_back(*p);
        }
        if (!n)
            for (const auto& p : cat.packages())
                if (p.has_manifest) todo.push_back(p);
        verify::Options vo;
        auto r = verify::verify_packages(s, todo, vo, nullptr, sink);
        if (out) *out = {r.packages, r.ok, r.mismatched};
        if (r.mismatched || failures)
            return fail(CASMIG_FAILED, std::to_string(r.mismatched) + " package(s) differ from their manifests in store " +
                                           s.root() + " (each problem named through the problem callback)");
        return CASMIG_OK;
    });
}

int casmig_status(casmig_store* handle, casmig_status_info* out) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!out) throw util::UsageError("out is NULL");
        *out = casmig_status_info{};
        auto st = lifecycle::status(s, 0);
        // Static storage for the mode string (the report's own dies with this call).
        out->mode = st.mode == "file-level" ? "file-level" : st.mode == "dual" ? "dual" : "legacy";
        out->packages = st.total;
        out->pending = st.states["pending"];
        out->in_progress = st.states["in_progress"];
        out->migrated = st.states["migrated"];
        out->verified = st.states["verified"];
        out->failed = st.states["failed"];
        out->rolled_back = st.states["rolled_back"];
        out->files = static_cast<std::uint64_t>(st.totals.files);
        out->logical_bytes = static_cast<std::uint64_t>(st.totals.logical_bytes);
        out->objects = static_cast<std::uint64_t>(st.totals.objects);
        out->stored_bytes = static_cast<std::uint64_t>(st.totals.stored_bytes);
        return CASMIG_OK;
    });
}

int casmig_package_entries(casmig_store* handle, const char* package, casmig_entry_fn fn, void* user) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!package || !fn) throw util::UsageError("package and fn must not be NULL");
        const std::string name = package;
        auto emit = [&](const manifest::Entry& e) {
            casmig_entry c{};
            c.path = e.path.data();
            c.path_len = e.path.size();
            c.type = static_cast<int>(e.type);
            c.mode = e.mode;
            c.size = e.size;
            c.digest = e.digest ? reinterpret_cast<const std::uint8_t*>(e.digest->raw().data()) : nullptr;
            if (e.type == manifest::EntryType::symlink) {
                c.target = e.target.data();
                c.target_len = e.target.size();
            }
            return fn(&c, user) == 0;
        };
        lifecycle::package_entries(s, name, emit);
        return CASMIG_OK;
    });
}

int casmig_open_file(casmig_store* handle, const char* package, const char* path, size_t path_len, int* fd_out) {
    if (fd_out) *fd_out = -1;
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!package || !path || !fd_out) throw util::UsageError("package, path and fd_out must not be NULL");
        const std::string name = package, rel(path, path_len);
        components(rel); // a plain relative path, checked before anything is looked up
        const std::string display = util::printable(name) + "/" + util::printable(rel);
        s.check_catalog(store::Purpose::read, "open");
        if (s.has_catalog()) {
            catalog::Catalog cat(s.db_path(), catalog::OpenMode::read_only);
            auto p = cat.package(name);
            if (p && p->has_manifest && p->state == catalog::PackageState::verified) {
                for (const auto& e : cat.manifest(p->id)) {
                    if (e.path != rel) continue;
                    if (e.type != manifest::EntryType::file || !e.digest)
                        throw util::UsageError(display + " is not a regular file of the package");
                    *fd_out = open_object(s, e, display).release();
                    return CASMIG_OK;
                }
                throw util::UsageError(display + " is not in the manifest of package " + util::printable(name));
            }
        }
        // Only a package directory: never objects/, migration/ or another of the store's own.
        if (!store::is_package_name(name))
            throw util::UsageError("package " + util::printable(name) + " is not a package id (one directory name, "
                                   "not one of the store's own): check the id with casmig list");
        *fd_out = open_legacy(s, name, rel).release();
        return CASMIG_OK;
    });
}

int casmig_add(casmig_store* handle, const char* package, const char* staging_dir, casmig_problem_fn problem, void* user,
               casmig_add_result* out) {
    if (out) *out = casmig_add_result{};
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!package || !staging_dir) throw util::UsageError("package and staging_dir must not be NULL");
        std::uint64_t failures = 0;
        auto sink = problem_sink(problem, user, &failures);
        auto lock = lifecycle::lock_store(s, "add", store::Purpose::write, sink,
                                          [&](const std::string& w) { sink({"-", "", w, true}); });
        auto r = lifecycle::add_package(s, package, staging_dir, 0, sink);
        if (out) *out = {r.files, r.bytes, r.new_objects, r.new_object_bytes};
        if (r.failed)
            return fail(CASMIG_FAILED, "package " + util::printable(package) + " was not added to store " + s.root() +
                                           " (each problem named through the problem callback): nothing recorded");
        return CASMIG_OK;
    });
}

int casmig_remove(casmig_store* handle, const char* package) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!package) throw util::UsageError("package must not be NULL");
        auto lock = lifecycle::lock_store(s, "remove", store::Purpose::destroy, nullptr, nullptr);
        // Removed. A ref in packages/ that could not be dropped is dropped by the next locked call's
        // sync (the catalog decides), so it is no failure of this one.
        (void)lifecycle::remove_package(s, package);
        return CASMIG_OK;
    });
}

int casmig_materialize(casmig_store* handle, const char* package, const char* dest, int link_mode) {
    return guarded([&]() -> int {
        auto& s = store_of(handle);
        if (!package || !dest) throw util::UsageError("package and dest must not be NULL");
        lifecycle::LinkMode m;
        switch (link_mode) {
        case CASMIG_LINK_COPY: m = lifecycle::LinkMode::copy; break;
        case CASMIG_LINK_REFLINK: m = lifecycle::LinkMode::reflink; break;
        case CASMIG_LINK_HARDLINK: m = lifecycle::LinkMode::hardlink; break;
        default: throw util::UsageError("link_mode " + std::to_string(link_mode) + " is not one of CASMIG_LINK_COPY, _REFLINK, _HARDLINK");
        }
        s.check_catalog(store::Purpose::read, "materialize");
        lifecycle::materialize(s, package, dest, m);
        return CASMIG_OK;
    });
}

} // extern "C"
