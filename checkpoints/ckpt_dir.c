/* ckpt_dir.c — the checkpoint directory: step-NNNNNNNN.h5 files, the `latest` pointer, stale
 * *.partial files and retention. Names are validated before use: `latest` is never trusted to hold
 * a path (it must be a bare step-*.h5 name). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "common/util.h"

/* step-<digits>.h5 (any number of digits); returns the step or -1. */
long long st_ckpt_name_step(const char *name) {
    size_t n = strlen(name);
    if (n < 9 || n >= ST_CKPT_NAME_MAX || strncmp(name, "step-", 5) != 0 || strcmp(name + n - 3, ".h5") != 0)
        return -1;
    long long v = 0;
    for (size_t i = 5; i < n - 3; i++) {
        if (name[i] < '0' || name[i] > '9' || v > (1LL << 55)) return -1;
        v = v * 10 + (name[i] - '0');
    }
    return v;
}

static int read_latest(const char *dir, char *name) {
    char path[1200], buf[ST_CKPT_NAME_MAX + 2];
    snprintf(path, sizeof path, "%s/latest", dir);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t k = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[k] = 0;
    while (k > 0 && (buf[k - 1] == '\n' || buf[k - 1] == ' ')) buf[--k] = 0;
    if (st_ckpt_name_step(buf) < 0 || strchr(buf, '/')) return -1;
    memcpy(name, buf, k + 1);
    return 0;
}

typedef struct {
    long long step;
    char name[ST_CKPT_NAME_MAX];
} entry;

static int by_step_desc(const void *a, const void *b) {
    long long x = ((const entry *)a)->step, y = ((const entry *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Complete checkpoints (step-*.h5 regular files), newest first. */
static int scan(const char *dir, entry **out, int *n) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : st_fail(ST_EIO, "checkpoint dir %s: %s", dir, strerror(errno));
    int cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long long s = st_ckpt_name_step(e->d_name);
        if (s < 0) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            entry *g = realloc(*out, (size_t)cap * sizeof *g);
            if (!g) { closedir(d); free(*out); *out = NULL; return st_fail(ST_ENOMEM, "out of memory"); }
            *out = g;
        }
        (*out)[*n].step = s;
        memcpy((*out)[*n].name, e->d_name, strlen(e->d_name) + 1); /* < ST_CKPT_NAME_MAX: checked by name_step */
        (*n)++;
    }
    closedir(d);
    if (*n) qsort(*out, (size_t)*n, sizeof **out, by_step_desc);
    return 0;
}

int st_ckpt_candidates(const char *dir, char (**names)[ST_CKPT_NAME_MAX], int *n) {
    entry *e;
    int k, rc = scan(dir, &e, &k);
    *names = NULL;
    *n = 0;
    if (rc || k == 0) return rc;
    *names = calloc((size_t)k, ST_CKPT_NAME_MAX);
    if (!*names) { free(e); return st_fail(ST_ENOMEM, "out of memory"); }
    char latest[ST_CKPT_NAME_MAX];
    int have_latest = read_latest(dir, latest) == 0, out = 0;
    if (have_latest)
        for (int i = 0; i < k; i++)
            if (strcmp(e[i].name, latest) == 0) memcpy((*names)[out++], latest, ST_CKPT_NAME_MAX);
    for (int i = 0; i < k; i++)
        if (!have_latest || strcmp(e[i].name, latest) != 0) memcpy((*names)[out++], e[i].name, ST_CKPT_NAME_MAX);
    *n = out;
    free(e);
    return 0;
}

int st_ckpt_resolve(const char *path, char *out, size_t out_len) {
    struct stat st;
    if (stat(path, &st) != 0) return st_fail(ST_EIO, "checkpoint %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        if ((size_t)snprintf(out, out_len, "%s", path) >= out_len) return st_fail(ST_EINVAL, "path too long: %s", path);
        return 0;
    }
    char (*names)[ST_CKPT_NAME_MAX];
    int n, rc = st_ckpt_candidates(path, &names, &n);
    if (rc) return rc;
    if (n == 0) return st_fail(ST_EIO, "checkpoint dir %s holds no complete checkpoint (step-*.h5)", path);
    rc = (size_t)snprintf(out, out_len, "%s/%s", path, names[0]) >= out_len ? st_fail(ST_EINVAL, "path too long: %s", path) : 0;
    free(names);
    return rc;
}

static int fsync_path(const char *path, int directory) {
    int fd = open(path, directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Rank 0 only: fsync the written file, rename it into place, fsync the directory. */
int st_ckpt_commit_file(const char *dir, const char *partial, const char *final_path) {
    if (fsync_path(partial, 0) != 0)
        return st_fail(ST_EIO, "checkpoint %s: fsync failed: %s", partial, strerror(errno));
    if (rename(partial, final_path) != 0)
        return st_fail(ST_EIO, "checkpoint %s: rename to %s failed: %s", partial, final_path, strerror(errno));
    fsync_path(dir, 1);
    return 0;
}

int st_ckpt_write_latest(const char *dir, const char *name) {
    char path[1200], line[ST_CKPT_NAME_MAX + 2];
    snprintf(path, sizeof path, "%s/latest", dir);
    int k = snprintf(line, sizeof line, "%s\n", name);
    int rc = st_write_file_atomic(path, line, (size_t)k);
    if (rc) return st_fail_context(rc, "checkpoint dir %s: updating latest", dir);
    fsync_path(dir, 1);
    return 0;
}

/* Removes *.partial leftovers of crashed saves (never the one being written: called before). */
void st_ckpt_remove_partials(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[1400];
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 8 && strcmp(e->d_name + n - 8, ".partial") == 0 && strncmp(e->d_name, "step-", 5) == 0) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    }
    closedir(d);
}

void st_ckpt_retain(const char *dir, int keep_last, const char *newest) {
    if (keep_last <= 0) return;
    entry *e;
    int n;
    if (scan(dir, &e, &n) != 0) return;
    int kept = 0;
    char path[1400];
    for (int i = 0; i < n; i++) {
        if (strcmp(e[i].name, newest) == 0 || kept < keep_last - 1) {
            if (strcmp(e[i].name, newest) != 0) kept++;
            continue;
        }
        snprintf(path, sizeof path, "%s/%s", dir, e[i].name);
        unlink(path);
    }
    free(e);
}
