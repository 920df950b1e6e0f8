/* cli_util.c — what every command shares (coordinator/cli/commands.h): the one error line, the --out
 * protocol (written beside OUT, renamed when complete) and the flag value parsers. In the library, so a
 * test driver (tests/tools/fakedev.c) runs the commands as `shardtune` does. */
#include "coordinator/cli/commands.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/util.h"

int st_cli_error(const char *cmd, const char *msg) {
    fprintf(stderr, "shardtune %s: error: %s\n", cmd, msg && *msg ? msg : "unknown failure");
    return ST_EXIT_FAIL;
}

/* 1 when path exists and holds something: a directory with an entry, a file of non-zero size, anything else. */
static int out_nonempty(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return 0;
    if (S_ISREG(sb.st_mode)) return sb.st_size > 0;
    if (!S_ISDIR(sb.st_mode)) return 1;
    DIR *d = opendir(path);
    if (!d) return 1;
    struct dirent *e;
    int any = 0;
    while (!any && (e = readdir(d)) != NULL) any = strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return any;
}

/* Removes a file, or a directory and the files directly inside it; a missing path is fine. */
static void remove_path(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) st_remove_dir_files(path);
    else unlink(path);
}

int st_cli_out_begin(const char *cmd, const char *out, int force, char *tmp, size_t cap) {
    if (!force && out_nonempty(out)) {
        char msg[4200];
        snprintf(msg, sizeof msg, "%s already exists and is not empty (pass --force to replace it)", out);
        return st_cli_error(cmd, msg);
    }
    size_t n = strlen(out);
    while (n > 1 && out[n - 1] == '/') n--; /* "dir/" -> sibling "dir.tmp-PID", not a child */
    if ((size_t)snprintf(tmp, cap, "%.*s.tmp-%ld", (int)n, out, (long)getpid()) >= cap)
        return st_cli_error(cmd, "--out path too long");
    remove_path(tmp);
    return 0;
}

int st_cli_out_end(const char *cmd, const char *out, const char *tmp, int ok) {
    if (!ok) { remove_path(tmp); return 0; }
    char old[4200];
    struct stat sb;
    snprintf(old, sizeof old, "%s.old-%ld", tmp, (long)getpid());
    int replace = lstat(out, &sb) == 0 && out_nonempty(out);
    if (replace && rename(out, old) != 0) {
        char msg[4400];
        snprintf(msg, sizeof msg, "cannot move %s aside to replace it: %s (the new one is in %s)", out, strerror(errno), tmp);
        return st_cli_error(cmd, msg);
    }
    if (rename(tmp, out) != 0) {
        char msg[4400];
        int e = errno;
        if (replace) rename(old, out); /* the old OUT back in place */
        snprintf(msg, sizeof msg, "cannot rename %s to %s: %s", tmp, out, strerror(e));
        remove_path(tmp);
        return st_cli_error(cmd, msg);
    }
    if (replace) remove_path(old);
    return 0;
}

int st_cli_bad_arg(const char *cmd, const char *arg) {
    fprintf(stderr, "shardtune %s: error: unknown or incomplete argument '%s'\n", cmd, arg ? arg : "");
    return ST_EXIT_USAGE;
}

int st_cli_missing(const char *cmd, const char *what) {
    fprintf(stderr, "shardtune %s: error: missing %s\n", cmd, what);
    return ST_EXIT_USAGE;
}

int st_cli_int(const char *cmd, const char *flag, const char *text, int64_t lo, int64_t hi, int64_t *out) {
    if (st_parse_i64(text, lo, hi, out) == 0) return 0;
    fprintf(stderr, "shardtune %s: error: %s: %s\n", cmd, flag, st_error());
    return ST_EXIT_USAGE;
}

int st_cli_real(const char *cmd, const char *flag, const char *text, double lo, double hi, double *out) {
    if (st_parse_f64(text, lo, hi, out) == 0) return 0;
    fprintf(stderr, "shardtune %s: error: %s: %s\n", cmd, flag, st_error());
    return ST_EXIT_USAGE;
}
