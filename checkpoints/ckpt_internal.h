/* ckpt_internal.h — helpers shared by the checkpoint files (not a public interface). */
#ifndef ST_CKPT_INTERNAL_H
#define ST_CKPT_INTERNAL_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

long long st_ckpt_name_step(const char *name);
int st_ckpt_commit_file(const char *dir, const char *partial, const char *final_path);
int st_ckpt_write_latest(const char *dir, const char *name);
void st_ckpt_remove_partials(const char *dir);
void st_ckpt_retain(const char *dir, int keep_last, const char *newest);

/* The innermost HDF5 error description of the current error stack ("" when none), e.g.
 * "file write failed: ... errno = 28, error message = 'No space left on device'". */
const char *st_ckpt_h5_reason(void);
/* Selects the flat range [a, b) of a dataset in its file space `fs` (as up to three boxes) and
 * returns a memory dataspace holding the same boxes in a window of whole rows: the range starts
 * *lead elements into a contiguous array of *window floats (lead 0 and window b - a when the
 * range is whole rows). Empty range: both selections are none, *window = 0. Caller closes it. */
hid_t st_ckpt_select_range(hid_t fs, int ndim, const int64_t shape[2], uint64_t a, uint64_t b, size_t *lead,
                           size_t *window);

/* Turns HDF5's automatic error printing off for this thread (the library never prints). */
void st_ckpt_h5_quiet(void);

#endif
