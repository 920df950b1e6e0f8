/* util.c — see util.h. */
#include "common/util.h"
#include "common/error.h"

#include <pthread.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

double st_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void *st_calloc_aligned(size_t bytes) {
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded == 0) rounded = 64;
    if (posix_memalign(&p, 64, rounded) != 0) return NULL;
    /* large blocks: whole pages are handed back (MADV_DONTNEED: private anonymous memory, as malloc's
     * always is, reads as zero on the next touch), so a buffer that is never written all over (a ZeRO-3
     * rank's full-size weight and gradient spaces) takes no memory for the parts it does not use */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), lo = (uintptr_t)p, hi = lo + rounded;
    uintptr_t plo = (lo + page - 1) / page * page, phi = hi / page * page;
    if (rounded < ((size_t)1 << 20) || phi <= plo || madvise((void *)plo, phi - plo, MADV_DONTNEED) != 0) {
        memset(p, 0, rounded);
        return p;
    }
    memset(p, 0, plo - lo);
    memset((void *)phi, 0, hi - phi);
    return p;
}

void st_give_back(void *x, size_t elem, size_t a, size_t b) {
    if (b <= a) return;
    uintptr_t lo = (uintptr_t)x + a * elem, hi = (uintptr_t)x + b * elem, page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t plo = (lo + page - 1) / page * page, phi = hi / page * page;
    if (phi <= plo) {
        memset((void *)lo, 0, hi - lo);
        return;
    }
    memset((void *)lo, 0, plo - lo);
    memset((void *)phi, 0, hi - phi);
    if (madvise((void *)plo, phi - plo, MADV_DONTNEED) != 0) memset((void *)plo, 0, phi - plo);
}

int st_read_file(const char *path, char **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return st_fail(ST_EIO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && !S_ISREG(sb.st_mode)) { /* a directory "opens" but has no size */
        fclose(f);
        return st_fail(ST_EIO, "%s is not a regular file%s", path, S_ISDIR(sb.st_mode) ? " (a directory)" : "");
    }
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return st_fail(ST_EIO, "cannot seek %s", path); }
    long n = ftell(f);
    if (n < 0) { fclose(f); return st_fail(ST_EIO, "cannot size %s", path); }
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) { fclose(f); return st_fail(ST_ENOMEM, "out of memory reading %s (%ld bytes)", path, n); }
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    if (got != (size_t)n) { free(buf); return st_fail(ST_EIO, "short read on %s", path); }
    buf[n] = 0;
    *data = buf;
    if (len) *len = (size_t)n;
    return 0;
}

int st_write_file_atomic(const char *path, const void *data, size_t len) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.partial", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return st_fail(ST_EIO, "cannot create %s: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            unlink(tmp);
            return st_fail(ST_EIO, "cannot write %s: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        return st_fail(ST_EIO, "cannot flush %s: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return st_fail(ST_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(e));
    }
    return 0;
}

int st_mkdirs(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return st_fail(ST_EINVAL, "bad directory path '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return st_fail(ST_EIO, "cannot create directory %s: %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return st_fail(ST_EIO, "%s exists and is not a directory", path);
    return 0;
}

int st_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long v = s ? strtoll(s, &end, 10) : 0;
    if (!s || !*s || *s == ' ' || *s == '\t' || *end || errno || v < lo || v > hi)
        return st_fail(ST_EINVAL, "expected an integer in %lld..%lld, got '%.64s'", (long long)lo, (long long)hi,
                       s ? s : "");
    *out = v;
    return 0;
}

int st_parse_f64(const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = s ? strtod(s, &end) : 0;
    if (!s || !*s || *s == ' ' || *s == '\t' || *end || errno || !isfinite(v) || v < lo || v > hi)
        return st_fail(ST_EINVAL, "expected a number in [%g, %g], got '%.64s'", lo, hi, s ? s : "");
    *out = v;
    return 0;
}

int st_num_threads(void) {
    const char *env = getenv("OMP_NUM_THREADS");
    int64_t n_env;
    /* a comma list ("4,2", nested levels) uses its first level; nonsense falls back to the mask */
    char first[32];
    snprintf(first, sizeof first, "%s", env ? env : "");
    first[strcspn(first, ",")] = 0;
    if (env && st_parse_i64(first, 1, ST_MAX_THREADS, &n_env) == 0) return (int)n_env;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

uint64_t st_fnv1a(uint64_t h, const void *data, size_t len) {
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int st_remove_dir_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return st_fail(ST_EIO, "cannot open directory %s: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    if (rmdir(dir) != 0) return st_fail(ST_EIO, "cannot remove %s: %s", dir, strerror(errno));
    return 0;
}

void st_path_stem(const char *path, char *out, size_t size) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t n = dot && dot > base ? (size_t)(dot - base) : strlen(base);
    if (n >= size) n = size - 1;
    memcpy(out, base, n);
    out[n] = 0;
}

static pthread_mutex_t h5_mutex = PTHREAD_MUTEX_INITIALIZER;

void st_h5_lock(void) { pthread_mutex_lock(&h5_mutex); }
void st_h5_unlock(void) { pthread_mutex_unlock(&h5_mutex); }
