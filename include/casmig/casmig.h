/* casmig.h — the C library of casmig, for package managers (libcasmig.so.0, pkg-config "casmig").
 *
 * A stable C ABI over the same core the casmig command line uses: the same store lock, the same
 * identity checks of the catalog against its store, the same recovery of what a stopped run left.
 * No C++ exception crosses this interface: every function that can fail returns one of the codes below
 * (the command line's exit codes) and leaves a one-line message for casmig_last_error().
 *
 * Threads: a casmig_store handle is used by one thread at a time (calls on one handle must not
 * overlap); separate handles, in one process or several, may be used at the same time. The store lock
 * serialises what changes the store (casmig_migrate, casmig_verify, casmig_add, casmig_remove): a call
 * made while another process holds it returns CASMIG_BUSY at once, unless casmig_set_lock_wait() lets
 * the handle wait for it. Reading (casmig_status,
 * casmig_package_entries, casmig_open_file, casmig_materialize) takes no store lock and never blocks on
 * a running migrate.
 *
 * Strings: package ids are directory names (bytes, NUL-terminated); paths inside a package are byte
 * strings with a length (they may hold any byte but NUL and '/' separators between components).
 * Everything a callback receives is valid only during the call.
 */
#ifndef CASMIG_CASMIG_H
#define CASMIG_CASMIG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CASMIG_API __attribute__((visibility("default")))

/* Return codes (the same numbers as the command line's exit codes, docs/operations.md). */
enum casmig_code {
    CASMIG_OK = 0,      /* done */
    CASMIG_FAILED = 1,  /* finished, but something failed (each problem went to the problem callback) */
    CASMIG_USAGE = 2,   /* bad argument or unusable input (unknown package, path not in the package) */
    CASMIG_REFUSED = 3, /* refused, the store is unchanged (e.g. the catalog does not belong to the store) */
    CASMIG_BUSY = 4     /* another process holds the store lock: try again later */
};

/* The library's version, e.g. "0.1.0". */
CASMIG_API const char *casmig_version(void);

/* The message of this thread's last call into the library: one line naming what failed, where, and
 * what to do; "" when that call succeeded. Valid until this thread's next call into the library. */
CASMIG_API const char *casmig_last_error(void);

typedef struct casmig_store casmig_store;

/* Opens the store at `root` (its catalog at db_path, or <root>/store.db when db_path is NULL). Touches
 * nothing on disk: the catalog is checked against the store by each call that uses it. *out is set to
 * a handle to pass to casmig_close(), or to NULL on failure. */
CASMIG_API int casmig_open(const char *root, const char *db_path, casmig_store **out);
/* Closes the handle (NULL is allowed). */
CASMIG_API void casmig_close(casmig_store *store);

/* How long the handle's calls wait for a lock another process holds, in milliseconds (default 0: not
 * at all, CASMIG_BUSY at once). It applies to the store lock that casmig_migrate, casmig_verify,
 * casmig_add and casmig_remove take, and to migration/gc.lock, which casmig_materialize takes shared
 * (a running `casmig gc` holds it). The lock is tried again every 50 ms; when the wait is over,
 * CASMIG_BUSY, and casmig_last_error() names the holder and how long the call waited. Values above ten
 * years count as ten years. Like `casmig --lock-wait DUR`, e.g. so that an upgrade during the nightly
 * batch waits for it instead of failing. CASMIG_USAGE for a NULL handle. */
CASMIG_API int casmig_set_lock_wait(casmig_store *store, uint64_t milliseconds);

/* Progress of a long call, reported from one thread at a time. */
typedef struct casmig_progress {
    const char *phase; /* "migrate", "verify", ... */
    uint64_t packages_done, packages_total;
    uint64_t files_done;
    uint64_t bytes_done, bytes_total; /* bytes_total 0: unknown */
} casmig_progress;
typedef void (*casmig_progress_fn)(const casmig_progress *progress, void *user);

/* A problem found by a call (a package that failed, a file that differs), as it is found. `path` is ""
 * for the package itself; `warning` is non-zero for something found and put right (no failure). */
typedef void (*casmig_problem_fn)(const char *package, const char *path, const char *message, int warning,
                                  void *user);

typedef struct casmig_migrate_result {
    uint64_t packages, migrated, verified, failed;
    uint64_t files, bytes;                  /* read from legacy trees */
    uint64_t new_objects, new_object_bytes; /* contents the store did not hold yet */
} casmig_migrate_result;

/* Migrates and verifies the n named packages (n == 0: every pending package), as `casmig migrate
 * PKG...` does: a package verified before whose legacy tree changed is migrated again. progress,
 * problem and out may be NULL. CASMIG_FAILED when a package failed (named through `problem`). */
CASMIG_API int casmig_migrate(casmig_store *store, const char *const *packages, size_t n, casmig_progress_fn progress,
                              casmig_problem_fn problem, void *user, casmig_migrate_result *out);

typedef struct casmig_verify_result {
    uint64_t packages, ok, mismatched;
} casmig_verify_result;

/* Verifies the n named packages (n == 0: every package with a manifest) against their legacy trees,
 * as `casmig verify PKG...` does, recording the result. CASMIG_FAILED when one differs. */
CASMIG_API int casmig_verify(casmig_store *store, const char *const *packages, size_t n, casmig_problem_fn problem,
                             void *user, casmig_verify_result *out);

typedef struct casmig_status_info {
    const char *mode; /* "legacy", "dual" or "file-level" (static storage) */
    uint64_t packages, pending, in_progress, migrated, verified, failed, rolled_back;
    uint64_t files, logical_bytes; /* in manifests */
    uint64_t objects, stored_bytes;
} casmig_status_info;

/* The store's mode and counts, as `casmig status --json` reports them. Takes no lock. */
CASMIG_API int casmig_status(casmig_store *store, casmig_status_info *out);

enum casmig_entry_type { CASMIG_ENTRY_FILE = 1, CASMIG_ENTRY_DIR = 2, CASMIG_ENTRY_SYMLINK = 3 };

typedef struct casmig_entry {
    const char *path; /* relative to the package root, "" for the root itself; not NUL-safe: use path_len */
    size_t path_len;
    int type;       /* enum casmig_entry_type */
    uint32_t mode;  /* the 07777 bits */
    uint64_t size;  /* files: content bytes; symlinks: target length; directories: 0 */
    const uint8_t *digest; /* files: the 32-byte BLAKE3 of the content, NULL when not known (legacy) */
    const char *target;    /* symlinks: the target bytes (target_len of them), else NULL */
    size_t target_len;
} casmig_entry;
/* Called once per entry, in path-byte order for a migrated package; a non-zero return stops the walk
 * (casmig_package_entries then returns CASMIG_OK). */
typedef int (*casmig_entry_fn)(const casmig_entry *entry, void *user);

/* The entries of a package in dual mode: from its manifest once the package is verified (digests
 * known), else from a walk of its legacy tree (digest NULL). Takes no lock. */
CASMIG_API int casmig_package_entries(casmig_store *store, const char *package, casmig_entry_fn fn, void *user);

/* Opens a regular file of a package for reading; *fd_out gets a read-only file descriptor the caller
 * closes. Once the package is verified the content comes from the store's object (one stored
 * compressed is decompressed into an anonymous memory file), else from the legacy tree, opened
 * without following any symlink. CASMIG_USAGE when the path is not a regular file of the package. */
CASMIG_API int casmig_open_file(casmig_store *store, const char *package, const char *path, size_t path_len,
                                int *fd_out);

typedef struct casmig_add_result {
    uint64_t files, bytes;                  /* read from the staging directory */
    uint64_t new_objects, new_object_bytes; /* contents the store did not hold yet */
} casmig_add_result;

/* Adds a new package straight in file-level form (the install path after cutover; allowed in every
 * mode, a legacy store becomes dual): every file under staging_dir becomes an object, the manifest
 * goes into packages/ and the catalog, staging_dir is compared with the manifest again (each file
 * re-hashed), and only then is the package recorded verified, with no legacy tree. staging_dir is only
 * read, never followed below its root (symlinks are stored as symlinks) and never changed: remove it
 * afterwards. Takes the store lock (CASMIG_BUSY if held). CASMIG_REFUSED when the id is already in
 * the store (add an upgrade under its new id, then casmig_remove the old one) or something is at
 * <store>/<package>; CASMIG_USAGE for a bad id or a staging_dir that cannot be opened; CASMIG_FAILED
 * (nothing recorded) for a special file, an unreadable entry or a file that changed while read, each
 * named through `problem`. A crash at any point leaves the package either added or absent. */
CASMIG_API int casmig_add(casmig_store *store, const char *package, const char *staging_dir, casmig_problem_fn problem,
                          void *user, casmig_add_result *out);

/* Drops a package: its manifest and, if present, its legacy tree (objects stay for `casmig gc`).
 * Takes the store lock (CASMIG_BUSY if held). CASMIG_USAGE when the package is not in the store. */
CASMIG_API int casmig_remove(casmig_store *store, const char *package);

enum casmig_link_mode { CASMIG_LINK_COPY = 0, CASMIG_LINK_REFLINK = 1, CASMIG_LINK_HARDLINK = 2 };

/* Rebuilds a package's tree at dest (absent, or an empty directory) from its manifest, as `casmig
 * materialize` does: COPY and REFLINK are exact (REFLINK falls back to a copy where the filesystem
 * cannot clone); HARDLINK links files to the read-only objects (write bits may differ; a compressed
 * object is copied). Takes no store lock; holds migration/gc.lock shared so that gc never deletes an
 * object it is linking (CASMIG_BUSY while a gc runs, once the casmig_set_lock_wait() wait is over).
 * CASMIG_USAGE for an unknown package or a dest that is not usable (inside the store, not empty);
 * CASMIG_REFUSED for a package with no manifest yet. */
CASMIG_API int casmig_materialize(casmig_store *store, const char *package, const char *dest, int link_mode);

#ifdef __cplusplus
}
#endif

#endif /* CASMIG_CASMIG_H */
