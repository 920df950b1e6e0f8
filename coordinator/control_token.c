/* control_token.c — job control token and CURVE key files (see control_token.h). */
#include "coordinator/control_token.h"

#include "common/error.h"
#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

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

/* ---- CURVE key files ---- */

int st_curve_available(void) { return zmq_has("curve") ? 1 : 0; }

static int run_file(const char *run_dir, const char *name, char *path, size_t n) {
    if (!run_dir || !*run_dir) return st_fail(ST_EINVAL, "monitor keys: empty run directory");
    if ((size_t)snprintf(path, n, "%s/%s", run_dir, name) >= n)
        return st_fail(ST_EINVAL, "monitor keys: run directory path too long: %s", run_dir);
    return 0;
}

/* Writes key + newline to PATH.tmp (O_EXCL, mode from the start), then renames it over path. */
static int write_key_file(const char *path, const char key[ST_CURVE_KEY_BUF], mode_t mode) {
    char tmp[4200];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return st_fail(ST_EINVAL, "monitor keys: path too long: %s", path);
    if (unlink(tmp) != 0 && errno != ENOENT)
        return st_fail(ST_EIO, "monitor keys: cannot remove stale %s: %s", tmp, strerror(errno));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0) return st_fail(ST_EIO, "monitor keys: cannot create %s: %s", tmp, strerror(errno));
    char line[ST_CURVE_KEY_LEN + 1];
    memcpy(line, key, ST_CURVE_KEY_LEN);
    line[ST_CURVE_KEY_LEN] = '\n';
    ssize_t w = write(fd, line, sizeof line);
    int bad = w != (ssize_t)sizeof line || fchmod(fd, mode) != 0 || fsync(fd) != 0;
    memset(line, 0, sizeof line);
    if (close(fd) != 0 || bad) {
        unlink(tmp);
        return st_fail(ST_EIO, "monitor keys: cannot write %s", tmp);
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return st_fail(ST_EIO, "monitor keys: cannot rename %s to %s: %s", tmp, path, strerror(e));
    }
    return 0;
}

int st_curve_keys_create(const char *run_dir, char public_z85[ST_CURVE_KEY_BUF], char secret_z85[ST_CURVE_KEY_BUF]) {
    char key_path[4096], pub_path[4096];
    int rc = run_file(run_dir, ST_CURVE_SECRET_FILE, key_path, sizeof key_path);
    if (!rc) rc = run_file(run_dir, ST_CURVE_PUBLIC_FILE, pub_path, sizeof pub_path);
    if (rc) return rc;
    if (!st_curve_available())
        return st_fail(ST_EINVAL, "monitor.curve: true, but this libzmq was built without CURVE (libsodium)");
    if (zmq_curve_keypair(public_z85, secret_z85) != 0)
        return st_fail(ST_EIO, "monitor keys: zmq_curve_keypair failed: %s", zmq_strerror(zmq_errno()));
    /* the secret first: once monitor.pub names the new key, the server that holds it is about to bind */
    rc = write_key_file(key_path, secret_z85, 0600);
    if (!rc) rc = write_key_file(pub_path, public_z85, 0644);
    return rc;
}

int st_curve_keys_remove(const char *run_dir) {
    const char *names[2] = {ST_CURVE_PUBLIC_FILE, ST_CURVE_SECRET_FILE};
    for (int i = 0; i < 2; i++) {
        char path[4096];
        int rc = run_file(run_dir, names[i], path, sizeof path);
        if (rc) return rc;
        if (unlink(path) != 0 && errno != ENOENT)
            return st_fail(ST_EIO, "monitor keys: cannot remove old %s: %s", path, strerror(errno));
    }
    return 0;
}

int st_curve_key_read_file(const char *path, int is_secret, char out[ST_CURVE_KEY_BUF]) {
    const char *what = is_secret ? "CURVE secret key file" : "CURVE server key file";
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return st_fail(ST_EIO, "cannot open %s %s: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return st_fail(ST_EINVAL, "%s %s is not a regular file", what, path);
    }
    if (is_secret && (st.st_mode & 077)) {
        close(fd);
        return st_fail(ST_EINVAL, "%s %s is readable by others (mode %03o): chmod 600 it", what, path,
                       (unsigned)(st.st_mode & 0777));
    }
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 0) return st_fail(ST_EIO, "cannot read %s %s", what, path);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
    int ok = n == ST_CURVE_KEY_LEN;
    if (ok) {
        uint8_t raw[32];
        memcpy(out, buf, ST_CURVE_KEY_LEN);
        out[ST_CURVE_KEY_LEN] = 0;
        /* zmq_z85_decode checks the alphabet and the length; memchr rules out an embedded NUL */
        ok = !memchr(buf, 0, ST_CURVE_KEY_LEN) && zmq_z85_decode(raw, out) != NULL;
        memset(raw, 0, sizeof raw);
    }
    memset(buf, 0, sizeof buf);
    if (!ok) {
        memset(out, 0, ST_CURVE_KEY_BUF);
        return st_fail(ST_EFORMAT, "%s %s must hold one %d-character Z85 key (like monitor.pub)", what, path,
                       ST_CURVE_KEY_LEN);
    }
    return 0;
}

int st_curve_client_key(const char *server_key_file, const char *run_dir, char out[ST_CURVE_KEY_BUF], char *from,
                        size_t from_n) {
    char path[4096];
    if (server_key_file && *server_key_file) {
        snprintf(path, sizeof path, "%s", server_key_file);
    } else {
        if (!run_dir || !*run_dir) return 0;
        int rc = run_file(run_dir, ST_CURVE_PUBLIC_FILE, path, sizeof path);
        if (rc) return rc;
        if (access(path, F_OK) != 0) return 0; /* a job without monitor.curve */
    }
    int rc = st_curve_key_read_file(path, 0, out);
    if (rc) return rc;
    if (from && from_n) snprintf(from, from_n, "%s", path);
    return 1;
}

int st_curve_client_setup(void *s, const char server_public_z85[ST_CURVE_KEY_BUF]) {
    if (!st_curve_available()) return st_fail(ST_ECOMM, "this libzmq was built without CURVE (libsodium)");
    char pub[ST_CURVE_KEY_BUF], sec[ST_CURVE_KEY_BUF];
    int rc = zmq_curve_keypair(pub, sec) != 0 ||
             zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, server_public_z85, ST_CURVE_KEY_LEN) != 0 ||
             zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, pub, ST_CURVE_KEY_LEN) != 0 ||
             zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, sec, ST_CURVE_KEY_LEN) != 0;
    memset(sec, 0, sizeof sec);
    return rc ? st_fail(ST_ECOMM, "cannot make a CURVE client socket: %s", zmq_strerror(zmq_errno())) : 0;
}

int st_curve_server_setup(void *s, const char *secret_z85) {
    int one = 1;
    if (!st_curve_available()) return st_fail(ST_ECOMM, "this libzmq was built without CURVE (libsodium)");
    if (!secret_z85 || strlen(secret_z85) != ST_CURVE_KEY_LEN)
        return st_fail(ST_EINVAL, "CURVE server: the secret key must be %d Z85 characters", ST_CURVE_KEY_LEN);
    if (zmq_setsockopt(s, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, secret_z85, ST_CURVE_KEY_LEN) != 0)
        return st_fail(ST_ECOMM, "cannot make a CURVE server socket: %s", zmq_strerror(zmq_errno()));
    return 0;
}

/* ---------------- monitor.addr ---------------- */

int st_monitor_addr_write(const char *run_dir, const char *publish, const char *control) {
    char path[4096], text[2200];
    snprintf(path, sizeof path, "%s/%s", run_dir, ST_MONITOR_ADDR_FILE);
    int n = snprintf(text, sizeof text, "publish %s\ncontrol %s\n", publish && *publish ? publish : "-",
                     control && *control ? control : "-");
    return st_write_file_atomic(path, text, (size_t)n);
}

int st_monitor_addr_read(const char *run_dir, const char *which, char *out, size_t size) {
    char path[4096], *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/%s", run_dir, ST_MONITOR_ADDR_FILE);
    if (st_read_file(path, &text, &len) != 0)
        return st_fail(ST_EIO, "%s not found: the job has not started its monitor yet, or %s is not its run_dir "
                       "(or pass ADDR)", path, run_dir);
    int rc = st_fail(ST_EFORMAT, "%s has no '%s' line", path, which);
    size_t wl = strlen(which);
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (!strncmp(line, which, wl) && line[wl] == ' ') {
            const char *v = line + wl + 1;
            if (!strcmp(v, "-")) rc = st_fail(ST_EINVAL, "the job of %s runs without a %s socket (monitor.%s is \"\")",
                                             run_dir, which, which);
            else if (strlen(v) >= size) rc = st_fail(ST_EFORMAT, "%s: the %s address is too long", path, which);
            else { memcpy(out, v, strlen(v) + 1); rc = 0; }
            break;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    return rc;
}
