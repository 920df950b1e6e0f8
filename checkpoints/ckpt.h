/* ckpt.h — training checkpoints: one HDF5 file per checkpoint, world-size independent (format:
 * docs/checkpoint-format.md).
 *
 * Writing is collective parallel HDF5 over the job's communicator: every rank writes exactly the
 * element ranges it owns (no gather), every dataset is contiguous and unfiltered and carries a
 * position-keyed checksum attribute (its integrity check) summed across ranks with one MPI_Allreduce. The commit is atomic
 * (NAME.partial, fsync, rename, then `latest` by write-temp + rename), and retention keeps the newest
 * checkpoint.keep_last files. Reading is plain (non-MPI) HDF5 on each rank: every rank reads all of
 * /model and its own optimizer range of /optim, whatever the world size at save.
 *
 * Memory: st_ckpt_info owns its strings and arrays (st_ckpt_info_free). Every other function borrows.
 * Library code: returns 0 or a negative ST_E* code with a one-line st_error() naming the file and
 * tensor. Collective functions return the same code on every rank. */
#ifndef ST_CKPT_H
#define ST_CKPT_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "checkpoints/model_io.h"
#include "worker/model.h"
#include "worker/optim.h"

#define ST_CKPT_FORMAT "shardtune-checkpoint"
#define ST_CKPT_VERSION 1
#define ST_CKPT_NAME_MAX 64 /* "step-00000100.h5" */

/* ---- pure layout helpers (unit-tested) ---- */

/* Checksum of n floats that sit at flat positions first, first+1, ... of a tensor (row-major in its
 * stored shape): sum_i splitmix64(i * 0x9E3779B97F4A7C15 ^ bits(x_i)) mod 2^64. Partial sums of
 * disjoint ranges add up (mod 2^64) to the whole tensor's checksum, in any order. */
uint64_t st_ckpt_checksum(const float *x, uint64_t first, size_t n);

/* With LoRA adapters (m->lora), checkpoints hold /model/<name> of the adapter tensors only and, as the
 * root attribute base_checksum, this combination of the frozen base tensors' checksums (sums[i]: tensor
 * i's st_ckpt_checksum over all of it); loading verifies it against the base model in memory. */
uint64_t st_ckpt_base_checksum(const st_model *m, const uint64_t *sums, size_t stride);
/* Whether tensor i is left out of /model (a frozen base tensor of a model with adapters). */
int st_ckpt_skips_tensor(const st_model *m, int i);
uint64_t st_ckpt_splitmix64(uint64_t z);

/* A box of a 1-D or 2-D dataset: start/count per dimension. */
typedef struct {
    uint64_t start[2], count[2];
} st_ckpt_slab;

/* The flat element range [a, b) of a row-major tensor of shape[ndim] (ndim 1 or 2) as at most three
 * boxes in row-major order (partial first row, full rows, partial last row). Returns the count (0
 * when a >= b). */
int st_ckpt_range_slabs(int ndim, const int64_t shape[2], uint64_t a, uint64_t b, st_ckpt_slab out[3]);

/* Even split of n elements over `world` ranks: [n*r/world, n*(r+1)/world). */
void st_ckpt_even_split(uint64_t n, int world, int rank, uint64_t *lo, uint64_t *hi);

/* The block shape a /model tensor of shape[ndim] is split into between writers (and the chunk shape of
 * files written before 2026-12-06): whole rows, about ST_CKPT_CHUNK_BYTES of float32, capped at the
 * dataset (a row longer than the target is one block row). */
#define ST_CKPT_CHUNK_BYTES (1u << 20)
void st_ckpt_chunk_shape(int ndim, const int64_t shape[2], uint64_t chunk[2]);

/* The flat range [lo, hi) of a replicated /model tensor that `rank` writes: whole blocks, the
 * tensor's blocks split evenly over the ranks, the split rotated by tensor_index so that one-block
 * tensors spread over the ranks. Every element has exactly one writer. */
void st_ckpt_model_part(int ndim, const int64_t shape[2], int world, int rank, int tensor_index, uint64_t *lo,
                        uint64_t *hi);

/* ---- writing ---- */

typedef struct {
    int64_t step;            /* completed updates (= LR schedule position) */
    uint64_t tokens_seen;
    int stage;               /* finetune stage index at save */
    double last_loss;        /* loss of the last completed step (NAN: none) */
    const char *job_spec;    /* st_config_to_json */
    const char *model_config;/* config.json text of the model */
    const uint64_t *loader_state;
    size_t loader_words;
    int n_tasks;
    const char *const *task_names;
    const uint64_t *task_checksums;
    /* multi-task weighting state (adaptive loss weighting); NULL/0 when there is none */
    const double *task_weighting;
    int task_weighting_len;
    uint64_t base_checksum;  /* st_ckpt_checksum of the base model's weights as loaded (0: not recorded) */
} st_ckpt_meta;

/* Collective. Writes DIR/step-%08lld.h5 atomically (DIR is created), updates DIR/latest, removes stale
 * *.partial files and all but the newest keep_last checkpoints (0 = keep all). `o` covers this rank's
 * optimizer range (a superset of the rank's even share of the compact space); under stage 0 every
 * rank holds everything and writes only its even share. On failure the previous checkpoints and
 * `latest` are untouched, the partial file is removed, and every rank returns the same code. The
 * committed file name (no directory) goes to name_out[ST_CKPT_NAME_MAX]; *write_seconds (optional)
 * is the time spent writing. */
int st_ckpt_save(MPI_Comm comm, const char *dir, const st_model *m, const st_optim *o, const st_ckpt_meta *meta,
                 int keep_last, char *name_out, double *write_seconds);

/* ---- snapshots and asynchronous saves ----
 * A save is two halves: a snapshot (collective over the training communicator: this rank's share of
 * the weights and optimizer moments copied to host memory, device-to-host through the backend's
 * copy_to_host slot, the checksums summed across ranks, the metadata deep-copied) and the write of
 * that snapshot (collective parallel HDF5 + atomic commit). The write touches neither the model nor
 * the optimizer, so training may go on while it runs. st_ckpt_save is both halves in a row (with a
 * host-memory model the snapshot borrows the live buffers instead of copying them). */
typedef struct st_ckpt_snap st_ckpt_snap;

/* Collective. copy = 0 may borrow the live buffers (host memory, no ZeRO-3/QLoRA residency): the
 * snapshot is then valid only until the weights change. */
int st_ckpt_snapshot(MPI_Comm comm, const st_model *m, const st_optim *o, const st_ckpt_meta *meta, int copy,
                     st_ckpt_snap **out);
/* Collective over `comm` (same ranks and order as the snapshot's). As st_ckpt_save. */
int st_ckpt_write_snapshot(MPI_Comm comm, const char *dir, const st_ckpt_snap *s, int keep_last, char *name_out,
                           double *write_seconds);
void st_ckpt_snap_free(st_ckpt_snap *s);
/* Bytes of host memory the snapshot holds (0 when it borrows). */
size_t st_ckpt_snap_bytes(const st_ckpt_snap *s);

/* The background writer: one write at a time, on a thread of its own with its own communicator
 * (MPI_Comm_dup of the training communicator; needs MPI_THREAD_MULTIPLE). HDF5 here is not built
 * thread-safe: while a write runs, other HDF5 calls of the process must hold st_h5_lock (common/util.h). */
typedef struct st_ckpt_async st_ckpt_async;

/* Collective. ST_EINVAL (message says why) when MPI does not provide MPI_THREAD_MULTIPLE. */
int st_ckpt_async_init(MPI_Comm comm, st_ckpt_async **out);
/* Collective over the training communicator. Takes a snapshot (copy) and starts its write in the
 * background; the previous write must have been collected (st_ckpt_async_wait). *blocked_seconds:
 * the time the caller was held (snapshot + thread start). A snapshot failure returns its code and
 * starts nothing. */
int st_ckpt_async_start(st_ckpt_async *a, const char *dir, const st_model *m, const st_optim *o,
                        const st_ckpt_meta *meta, int keep_last, double *blocked_seconds);
/* Local: 1 while a started write has not been collected yet and is still running. */
int st_ckpt_async_running(const st_ckpt_async *a);
/* Local: 1 when a write was started and not collected. */
int st_ckpt_async_pending(const st_ckpt_async *a);
/* Waits for the write and collects it: its code (the same on every rank), step, file name and
 * write time. 0 with *step = -1 when nothing was pending. */
int st_ckpt_async_wait(st_ckpt_async *a, int64_t *step, char *name_out, double *write_seconds);
/* Waits for a pending write (its result is dropped), frees the communicator. NULL is fine. */
void st_ckpt_async_free(st_ckpt_async *a);

/* ---- reading ---- */

typedef struct {
    char path[1024];
    int version;
    int64_t step;
    uint64_t tokens_seen;
    int stage, world_size;
    double last_loss;
    char *job_spec, *model_config;
    uint64_t *loader_state;
    size_t loader_words;
    int n_tasks;
    char (*task_names)[128];
    uint64_t *task_checksums;
    double *task_weighting;
    int task_weighting_len;
    uint64_t base_checksum;  /* 0 when the checkpoint predates it */
} st_ckpt_info;

/* Reads the root attributes (no tensors). Refuses files that are not shardtune checkpoints or have a
 * newer version. */
int st_ckpt_read_info(const char *path, st_ckpt_info *info);
void st_ckpt_info_free(st_ckpt_info *info);

/* Reads every /model tensor into host_weights (m->n_weights floats, the model's layout), refusing a
 * missing tensor or a shape that differs from the model (names the tensor), and verifying each
 * tensor's checksum attribute (ST_ECORRUPT naming it). Local: no communication. */
int st_ckpt_load_model(const char *path, const st_model *m, float *host_weights);
/* The same for an adapter run's checkpoint (LoRA / DoRA / prompt family), without an image of the base: the
 * base is only checked against adapter_base_checksum (summed a piece at a time from the model's own weights,
 * widened where held in bf16 only), host_weights gets the adapters' tensors at their offsets and nothing else
 * is written (a resume that keeps the model's base as it is: st_ckpt_skips_tensor's tensors). */
int st_ckpt_load_adapters(const char *path, const st_model *m, float *host_weights);

/* A resume without an image of the weights (full / frozen / progressive on host memory): st_ckpt_check_model
 * makes st_ckpt_load_model's checks (every tensor present, its shape, its checksum, the same messages) reading
 * a piece of whole rows at a time and keeping nothing; once every other check of the resume has passed,
 * st_ckpt_load_model_in_place reads the tensors straight into m->weights (at and above n_w16), verifying them
 * again. A failure there leaves the weights partly overwritten. Local. */
int st_ckpt_check_model(const char *path, const st_model *m);
int st_ckpt_load_model_in_place(const char *path, st_model *m);

/* One /model tensor (parameter i of m) into dst (numel floats, the model's layout), with the same shape and
 * checksum checks: what a streamed export reads, a tensor at a time. Local. */
int st_ckpt_load_param(const char *path, const st_model *m, int i, float *dst);

/* Collective. Reads the optimizer moments of the compact range [lo, hi) of m's current trainable set
 * into host m_out/v_out ([hi - lo] floats, padding zeroed) and every trainable parameter's step count
 * into param_step[n_params]. Checksums are verified across ranks (ST_ECORRUPT naming the tensor).
 * Refuses a trainable parameter without state or with another size. */
int st_ckpt_load_optim(MPI_Comm comm, const char *path, const st_model *m, size_t lo, size_t hi, float *m_out,
                       float *v_out, int *param_step);

/* Reads back every dataset of the file (HDF5 checks Fletcher32 in files that have it) and recomputes
 * its checksum.
 * 0 with *n_tensors set, or ST_ECORRUPT / ST_EFORMAT naming the first bad tensor. */
int st_ckpt_verify(const char *path, int *n_tensors);

/* One row per dataset, for `ckpt inspect`. */
typedef void (*st_ckpt_tensor_fn)(void *ctx, const char *name, int ndim, const uint64_t *dims, uint64_t stored_bytes);
int st_ckpt_list_tensors(const char *path, st_ckpt_tensor_fn fn, void *ctx);

/* Reads one /model tensor by name into a host buffer of `numel` floats (export). */
int st_ckpt_read_tensor(const char *path, const char *dataset, float *out, size_t numel);

/* ---- the checkpoint directory ---- */

/* Complete checkpoints of DIR, best first: the one `latest` names, then the others by step,
 * newest first. *names is malloc'ed (free with free()); *n = 0 when there are none. */
int st_ckpt_candidates(const char *dir, char (**names)[ST_CKPT_NAME_MAX], int *n);

/* PATH if it is a file, else DIR/<latest or newest complete checkpoint>. */
int st_ckpt_resolve(const char *path, char *out, size_t out_len);

/* 0 when every weight of m is finite, else ST_EFORMAT naming `source` (the model dir), the tensor and
 * the first bad element. Reads through the backend in 4 MB pieces. */
int st_model_check_finite(const st_model *m, const char *source);
/* The same check on host values x[n] of tensor `name`, elements first.. of it (the QLoRA streamed load). */
int st_check_finite_values(const float *x, size_t n, size_t first, const char *source, const char *name);
/* The same over the elements `keep` selects of each parameter (model_io.h; NULL = all): what a rank
 * that loaded only its parts (streaming load) holds. */
int st_model_check_finite_part(const st_model *m, const char *source, st_model_keep_fn keep, void *ctx);

#endif
