// casmig::io — the I/O seam under every durable step (cas, lifecycle, materialize, store).
//
// In a normal build each function is the system call it names, nothing more. In a build configured with
// `-Dtest_seams=true` (tools/build does; the release package does not), tests drive the seam through the
// environment of the casmig process:
//
//   CASMIG_CRASH_AT=NAME[@N]      at the Nth time (default 1st) crash point NAME is reached, crash.
//   CASMIG_CRASH_MODE=kill        (default) the process dies by SIGKILL: the page cache survives.
//                    =power-data  a power cut: file data written since its last fsync/syncfs is lost
//                                 (the file is truncated to 0), names persist (the worst case for
//                                 "data before name").
//                    =power-names a power cut: renames, links and mkdirs since the last sync of their
//                                 directory are undone, data persists (the worst case for "name before
//                                 record").
//   CASMIG_CRASH_TRACE=FILE       append "NAME\n" to FILE each time a crash point is reached (tests use
//                                 it to enumerate the points of a command).
//   CASMIG_FAULT=OP@N[+]=ERR[,…]  the Nth call of OP fails with ERR (ENOSPC, EIO, EACCES, EDQUOT, EROFS,
//                                 EPERM, ENOENT: a name another process removed since it was looked at);
//                                 with '+', that call and every later one. OP: write, fsync, syncfs,
//                                 rename, link, unlink, mkdir, open (O_CREAT opens only), copy.
//   CASMIG_FAULT_TRACE=FILE       at exit, append "OP CALLS" for each OP to FILE (tests use it to pick N).
//   CASMIG_HOOK_AT=POINT[@N] with CASMIG_HOOK_CMD=CMD: the Nth time POINT is reached, run CMD (sh -c)
//                                 and go on (a test changes a file at an exact moment of a command).
//                                 $PPID in CMD is casmig; signals stay as they were while CMD runs
//                                 (not std::system(), which ignores SIGINT), so CMD may signal casmig.
//
// Crash points name durable steps "command.step" (e.g. "cleanup.moved-aside"); docs/reliability.md
// lists them. Sync semantics of the power-cut model: syncfs() makes everything durable; fsync(fd) makes
// that file's data durable and, for a directory fd, the entries created in that directory.
#pragma once
#include <cstddef>
#include <sys/types.h>

namespace casmig::io {

/// True in a build with test seams (the e2e crash and fault tests skip otherwise).
bool seams_enabled() noexcept;

/// A named durable step: may crash here (test builds only). Cheap when no crash is asked for.
void crash_point(const char* name) noexcept;

// Each returns what the system call returns (-1 and errno on failure).
ssize_t write(int fd, const void* buf, size_t len) noexcept;
ssize_t pwrite(int fd, const void* buf, size_t len, off_t off) noexcept;
int fsync(int fd) noexcept;
int syncfs(int fd) noexcept;
int renameat2(int olddirfd, const char* oldname, int newdirfd, const char* newname, unsigned flags) noexcept;
int linkat(int olddirfd, const char* oldname, int newdirfd, const char* newname, int flags) noexcept;
int unlinkat(int dirfd, const char* name, int flags) noexcept;
int mkdirat(int dirfd, const char* name, mode_t mode) noexcept;
/// openat with O_CREAT counts as OP "open" for faults; the file is tracked for the power-cut model.
int openat_create(int dirfd, const char* name, int flags, mode_t mode) noexcept;
/// openat(dirfd, ".", O_TMPFILE | flags, mode): an unnamed file on dirfd's filesystem, gone with its
/// last fd unless linked (linkat) somewhere. Counts as OP "open" for faults; no name to track.
int open_tmpfile(int dirfd, int flags, mode_t mode) noexcept;
ssize_t copy_file_range(int in, int out, size_t len) noexcept;
/// Data reached fd by other means (FICLONE, …): tracked as unsynced.
void note_written(int fd) noexcept;

} // namespace casmig::io
