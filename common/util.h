/* util.h — small shared helpers: time, allocation, file reading, paths, threads.
 * Every function that returns memory says so; the caller frees it with free(). */
#ifndef ST_UTIL_H
#define ST_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Monotonic time in seconds. */
double st_now(void);
/* The process-wide HDF5 lock: Debian's parallel HDF5 is not thread-safe, and a background checkpoint
 * write (checkpoints/ckpt_async.c) holds it while it runs; every HDF5 user in a multi-threaded
 * process takes it around its calls. Not recursive. */
void st_h5_lock(void);
void st_h5_unlock(void);

/* 64-byte aligned, zeroed allocation; NULL on failure (free with free()). Blocks of 1 MiB or more get
 * their whole pages from the system lazily (no memory is resident until a page is written). */
void *st_calloc_aligned(size_t bytes);

/* Gives the memory of elements [a, b) of x (elem bytes each; host memory from malloc) back to the system:
 * the whole pages inside it with madvise(MADV_DONTNEED) (private anonymous memory reads as zeros on the
 * next touch); the partial pages at either end are shared with neighbouring data, so only the range's own
 * elements there are zeroed. The range reads as zero afterwards. */
void st_give_back(void *x, size_t elem, size_t a, size_t b);

/* Reads a whole file into a malloc'ed buffer (NUL-terminated; *len excludes the NUL).
 * Returns 0 or ST_EIO with a message naming the path. */
int st_read_file(const char *path, char **data, size_t *len);

/* Writes `len` bytes to `path` atomically: PATH.partial, fsync, rename. */
int st_write_file_atomic(const char *path, const void *data, size_t len);

/* Removes the regular files directly inside `dir`, then the directory (no recursion). */
int st_remove_dir_files(const char *dir);

/* The file name of `path` without directories and extension ("configs/qa.v2.h5" -> "qa.v2"). */
void st_path_stem(const char *path, char *out, size_t size);

/* mkdir -p. */
int st_mkdirs(const char *path);

/* Strict numbers for command lines and environment variables: the whole string in base 10 (no blanks,
 * no trailing text), finite, within [lo, hi]. 0, or ST_EINVAL with a message "expected an integer in
 * LO..HI, got 'TEXT'" (callers add the flag's name with st_fail_context). */
int st_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);
int st_parse_f64(const char *s, double lo, double hi, double *out);

/* Threads this rank should use: OMP_NUM_THREADS if set (1..ST_MAX_THREADS), else the CPUs in its affinity mask. */
#define ST_MAX_THREADS 1024
int st_num_threads(void);

/* 64-bit FNV-1a over bytes, chainable (pass the previous hash, or ST_FNV_INIT). */
#define ST_FNV_INIT 0xcbf29ce484222325ULL
uint64_t st_fnv1a(uint64_t h, const void *data, size_t len);

#endif
