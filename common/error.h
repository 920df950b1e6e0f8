/* error.h — how library code reports failure.
 *
 * Library functions never print or exit: they return 0 on success or a negative ST_E* code, and
 * set a one-line message (st_error()) that names the input, key, file, tensor or rank at fault.
 * Only the CLI prints it. The message buffer is thread-local and owned by this module. */
#ifndef ST_ERROR_H
#define ST_ERROR_H

enum {
    ST_OK = 0,
    ST_EINVAL = -1,   /* bad argument or value given by the user */
    ST_EIO = -2,      /* file or socket I/O failed */
    ST_ENOMEM = -3,   /* allocation failed */
    ST_EFORMAT = -4,  /* a file's contents are malformed or truncated */
    ST_ESHAPE = -5,   /* tensor shapes disagree */
    ST_ECONFIG = -6,  /* invalid configuration */
    ST_ECOMM = -7,    /* MPI / NCCL / ZeroMQ failure */
    ST_ECORRUPT = -8, /* checksum mismatch */
    ST_EDEVICE = -9,  /* requested device/backend unavailable */
};

/* Sets the message (printf-style) and returns `code`, so callers can write
 * `return st_fail(ST_EINVAL, "...")`. */
int st_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends "context: " to the current message (for adding a file name or rank on the way up). */
int st_fail_context(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message set on this thread ("" if none). */
const char *st_error(void);

#endif
