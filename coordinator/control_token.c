/* control_token.c — job control token file (see control_token.h). */
#include "coordinator/control_token.h"

#include "common/error.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int token_path(const char *run_dir, char *path, size_t n) {
    if (!run_dir || !*run_dir) return st_fail(ST_EINVAL, "control token: empty run directory");
    if ((size_t)snprintf(path, n, "%s/%s", run_dir, ST_TOKEN_FILE) >= n)
        return st_fail(ST_EINVAL, "control token: run directory path too long: %s", run_dir);
    return 0;
}

static int read_full(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

int st_token_create(const char *run_dir, char out[ST_TOKEN_BUF]) {
    char path[4096];
    int rc = token_path(run_dir, path, sizeof path);
    if (rc) return rc;
    unsigned char raw[16];
    int ur = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (ur < 0 || read_full(ur, raw, sizeof raw) != 0) {
        if (ur >= 0) close(ur);
        return st_fail(ST_EIO, "control token: cannot read /dev/urandom");
    }
    close(ur);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[32] = 0;
    if (unlink(path) != 0 && errno != ENOENT)
        return st_fail(ST_EIO, "control token: cannot remove old %s: %s", path, strerror(errno));
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return st_fail(ST_EIO, "control token: cannot create %s: %s", path, strerror(errno));
    char line[ST_TOKEN_BUF + 1];
    memcpy(line, out, 32);
    line[32] = '\n';
    ssize_t w = write(fd, line, 33);
    int bad = w != 33 || fchmod(fd, 0600) != 0 || fsync(fd) != 0;
    if (close(fd) != 0 || bad) {
        unlink(path);
        return st_fail(ST_EIO, "control token: cannot write %s", path);
    }
    return 0;
}

int st_token_read_file(const char *path, char out[ST_TOKEN_BUF]) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return st_fail(ST_EIO, "cannot open token file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return st_fail(ST_EINVAL, "token file %s is not a regular file", path);
    }
    if (st.st_mode & 077) {
        close(fd);
        return st_fail(ST_EINVAL, "token file %s is readable by others (mode %03o): chmod 600 it", path,
                       (unsigned)(st.st_mode & 0777));
    }
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 0) return st_fail(ST_EIO, "cannot read token file %s", path);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
    if (n != 32) return st_fail(ST_EFORMAT, "token file %s must hold 32 hex characters", path);
    for (int i = 0; i < 32; i++) {
        char c = buf[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
            return st_fail(ST_EFORMAT, "token file %s must hold 32 hex characters", path);
    }
    memcpy(out, buf, 32);
    out[32] = 0;
    return 0;
}

int st_token_read(const char *run_dir, char out[ST_TOKEN_BUF]) {
    char path[4096];
    int rc = token_path(run_dir, path, sizeof path);
    if (rc) return rc;
    return st_token_read_file(path, out);
}
