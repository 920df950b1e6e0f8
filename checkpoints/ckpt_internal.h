/* ckpt_internal.h — helpers shared by the checkpoint files (not a public interface). */
#ifndef ST_CKPT_INTERNAL_H
#define ST_CKPT_INTERNAL_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "checkpoints/ckpt.h"

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

/* One tensor of a snapshot: what this rank writes of it and the whole tensor's checksums. */
typedef struct {
    char name[96];
    int ndim, transposed, trainable, skip;
    int64_t shape[2], step;
    uint64_t ma, mb, oa, ob;  /* this rank's /model and /optim element ranges */
    const float *w, *m, *v;   /* the data of those ranges (into the snapshot's copy, or the live buffers) */
    const uint16_t *w16;      /* instead of w when borrowed: the bf16 copy of a frozen tensor held in bf16 only
                                 (worker/model.h st_model_drop_frozen_fp32), widened as it is written */
    uint64_t sum_w;           /* skipped (frozen base) tensors only: the whole tensor's checksum */
} st_ckpt_snap_param;

/* Everything a checkpoint write needs, detached from the model and optimizer (see ckpt.h). */
struct st_ckpt_snap {
    int rank, world, n, adapters;
    st_ckpt_snap_param *p;
    float *buf;                       /* the copy (NULL when the snapshot borrows the live buffers) */
    int buf_borrowed;                 /* buf belongs to the caller of st_ckpt_snapshot_reuse */
    size_t copied;                    /* floats in buf */
    uint64_t adapter_base_checksum, n_weights, n_grads;
    st_ckpt_meta meta;                /* deep copy: every pointer below is owned */
    char *job_spec, *model_config, *names_block;
    const char **task_names;
    uint64_t *loader_state, *task_checksums;
    double *task_weighting;
};

/* st_ckpt_snapshot with a copy buffer the caller keeps between saves (*keep, *keep_cap floats; grown
 * when too small): the background writer reuses it, so its pages are not faulted in again. */
int st_ckpt_snapshot_reuse(MPI_Comm comm, const st_model *m, const st_optim *o, const st_ckpt_meta *meta, int copy,
                           float **keep, size_t *keep_cap, st_ckpt_snap **out);

/* The two halves of st_ckpt_write_snapshot, both collective. prepare: rank 0 creates the directory,
 * removes stale partial files and reserves the file's size (a full disk or a file-size limit fails
 * here, before any write: the async writer runs it on the training thread, so such a failure is
 * reported at the save step itself). write_prepared: checksums, the HDF5 file, the commit. */
int st_ckpt_prepare(MPI_Comm comm, const char *dir, const st_ckpt_snap *s);
int st_ckpt_write_prepared(MPI_Comm comm, const char *dir, const st_ckpt_snap *s, int keep_last, char *name_out,
                           double *write_seconds);

#endif
