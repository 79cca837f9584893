/* pm — a tiny package-manager-like client of libcasmig (include/casmig/casmig.h).
 *
 *   pm STORE install PKG DIR  add a package from a staging directory straight in file-level form
 *   pm STORE upgrade OLD NEW DIR   install NEW from DIR, then remove OLD (what an upgrade is)
 *   pm STORE remove PKG       drop a package (its objects stay for `casmig gc`)
 *   pm STORE migrate PKG...   migrate (and verify) legacy packages, as a package manager does on upgrade
 *   pm STORE materialize PKG DEST   rebuild a package's tree at DEST (copies)
 *   pm STORE ls PKG           list a package's entries in dual mode (digest once it is verified)
 *   pm STORE cat PKG PATH     write one file of a package to stdout (from the CAS once verified)
 *   pm STORE status           the store's mode and counts
 *
 * Exit status: the library's code (0 ok, 1 failed, 2 usage, 3 refused, 4 busy). Build:
 *   cc pm.c $(pkg-config --cflags --libs casmig) -o pm
 */
#include <casmig/casmig.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_problem(const char *package, const char *path, const char *message, int warning, void *user) {
    (void)user;
    fprintf(stderr, "pm: %s%s%s%s: %s\n", warning ? "warning: " : "", package, *path ? "/" : "", path, message);
}

static int on_entry(const casmig_entry *e, void *user) {
    (void)user;
    static const char *types[] = {"?", "file", "dir", "symlink"};
    printf("%-7s %04o %10llu ", types[e->type >= 1 && e->type <= 3 ? e->type : 0], (unsigned)e->mode,
           (unsigned long long)e->size);
    if (e->digest)
        for (int i = 0; i < 32; ++i) printf("%02x", e->digest[i]);
    else
        printf("%64s", "-");
    printf(" %.*s\n", (int)e->path_len, e->path);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: pm STORE install PKG DIR | upgrade OLD NEW DIR | remove PKG | migrate PKG... | ls PKG |"
                        " cat PKG PATH | materialize PKG DEST | status\n");
        return CASMIG_USAGE;
    }
    casmig_store *s = NULL;
    int rc = casmig_open(argv[1], NULL, &s);
    if (rc != CASMIG_OK) {
        fprintf(stderr, "pm: %s\n", casmig_last_error());
        return rc;
    }
    const char *cmd = argv[2];
    if (!strcmp(cmd, "install") && argc == 5) {
        casmig_add_result r;
        rc = casmig_add(s, argv[3], argv[4], on_problem, NULL, &r);
        if (rc == CASMIG_OK)
            printf("installed %s: %llu files, %llu bytes, %llu new objects\n", argv[3], (unsigned long long)r.files,
                   (unsigned long long)r.bytes, (unsigned long long)r.new_objects);
    } else if (!strcmp(cmd, "upgrade") && argc == 6) {
        /* The new version first: a failure leaves the old one installed and untouched. */
        casmig_add_result r;
        rc = casmig_add(s, argv[4], argv[5], on_problem, NULL, &r);
        if (rc == CASMIG_OK) rc = casmig_remove(s, argv[3]);
        if (rc == CASMIG_OK)
            printf("upgraded %s to %s: %llu files, %llu new objects\n", argv[3], argv[4], (unsigned long long)r.files,
                   (unsigned long long)r.new_objects);
    } else if (!strcmp(cmd, "remove") && argc == 4) {
        rc = casmig_remove(s, argv[3]);
        if (rc == CASMIG_OK) printf("removed %s\n", argv[3]);
    } else if (!strcmp(cmd, "materialize") && argc == 5) {
        rc = casmig_materialize(s, argv[3], argv[4], CASMIG_LINK_COPY);
    } else if (!strcmp(cmd, "migrate")) {
        casmig_migrate_result r;
        rc = casmig_migrate(s, (const char *const *)argv + 3, (size_t)(argc - 3), NULL, on_problem, NULL, &r);
        if (rc == CASMIG_OK || rc == CASMIG_FAILED)
            printf("migrated %llu, verified %llu, failed %llu, %llu new objects\n", (unsigned long long)r.migrated,
                   (unsigned long long)r.verified, (unsigned long long)r.failed, (unsigned long long)r.new_objects);
    } else if (!strcmp(cmd, "ls") && argc == 4) {
        rc = casmig_package_entries(s, argv[3], on_entry, NULL);
    } else if (!strcmp(cmd, "cat") && argc == 5) {
        int fd = -1;
        rc = casmig_open_file(s, argv[3], argv[4], strlen(argv[4]), &fd);
        if (rc == CASMIG_OK) {
            char buf[65536];
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, (size_t)n, stdout);
            close(fd);
        }
    } else if (!strcmp(cmd, "status")) {
        casmig_status_info st;
        rc = casmig_status(s, &st);
        if (rc == CASMIG_OK)
            printf("mode %s, %llu packages (%llu verified, %llu pending, %llu failed), %llu objects\n", st.mode,
                   (unsigned long long)st.packages, (unsigned long long)st.verified, (unsigned long long)st.pending,
                   (unsigned long long)st.failed, (unsigned long long)st.objects);
    } else {
        fprintf(stderr, "pm: unknown command %s\n", cmd);
        rc = CASMIG_USAGE;
    }
    if (rc != CASMIG_OK) fprintf(stderr, "pm: %s\n", casmig_last_error());
    casmig_close(s);
    return rc;
}
