/* ckpt_write.c — parallel-HDF5 checkpoint writer (see ckpt.h, docs/checkpoint-format.md).
 *
 * Every rank calls every HDF5 metadata function in the same order with the same arguments (metadata
 * operations and the flush at close are collective); the data goes out with independent transfers,
 * each rank writing only the ranges it owns of contiguous, unfiltered datasets, summing each range's
 * checksum just before writing it. The ranks synchronise a handful of times per file (file created,
 * groups, after the data, the one checksum reduction, close), not per dataset: a rank whose write
 * failed keeps making the same metadata calls with nothing written, so nobody waits in a collective
 * the others skipped, and the agreement after the data ends the save on all ranks together.
 * Host staging buffers are allocated here and freed before returning.
 *
 * Where the time went (bench/ckpt_bench, 85 MB; numbers in its header and bench/RESULTS.md): HDF5
 * walking every element to map a 1-D memory space onto 2-D chunks (fixed in ckpt_select.c), then the
 * synchronisation points per dataset on a busy machine (two or three collectives per dataset, ~120
 * datasets), then the Fletcher32 filter (its byte-wise sum inside HDF5 plus a copy of every chunk: ~70%
 * of a 1-rank save, 2026-12-06) and the separate checksum pass over the data. Hence no filter, no
 * chunking, independent transfers, the checksum in the write's pass. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "common/util.h"
#include "kernels/bf16.h"

/* ---------------- HDF5 error text ---------------- */

static __thread char h5_reason[512];

static herr_t first_error(unsigned n, const H5E_error2_t *e, void *ctx) {
    (void)ctx;
    (void)n;
    if (!h5_reason[0] && e->desc && e->desc[0]) snprintf(h5_reason, sizeof h5_reason, "%s", e->desc);
    return 0;
}

const char *st_ckpt_h5_reason(void) {
    h5_reason[0] = 0;
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, first_error, NULL);
    return h5_reason;
}

void st_ckpt_h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

/* ---------------- attributes (collective: same values on every rank) ---------------- */

static int attr_raw(hid_t obj, const char *name, hid_t type, hsize_t n, const void *data) {
    hid_t sp = n ? H5Screate_simple(1, &n, NULL) : H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t w = a >= 0 ? H5Awrite(a, type, data) : -1;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return w < 0 ? -1 : 0;
}

static int attr_i64(hid_t obj, const char *name, int64_t v) { return attr_raw(obj, name, H5T_NATIVE_INT64, 0, &v); }
static int attr_u64(hid_t obj, const char *name, uint64_t v) { return attr_raw(obj, name, H5T_NATIVE_UINT64, 0, &v); }

static int attr_str(hid_t obj, const char *name, const char *s) {
    hid_t t = H5Tcopy(H5T_C_S1);
    size_t len = strlen(s);
    H5Tset_size(t, len ? len : 1);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    int rc = attr_raw(obj, name, t, 0, len ? s : "");
    H5Tclose(t);
    return rc;
}

/* ---------------- one dataset ---------------- */

typedef struct {
    MPI_Comm comm;
    int rank, world;
    hid_t file;
    const char *path;
} writer;

/* All ranks learn whether any rank failed; returns 0 or the failing code on every rank. */
/* The lowest failing rank's code and message reach every rank, so rank 0 can print the real cause. */
static int agree(writer *w, int rc) {
    int mine[2] = {rc ? w->rank : w->world, rc}, first[2];
    MPI_Allreduce(mine, first, 1, MPI_2INT, MPI_MINLOC, w->comm);
    if (first[0] == w->world) return 0;
    int code = rc;
    char msg[600];
    snprintf(msg, sizeof msg, "%s", st_error());
    MPI_Bcast(&code, 1, MPI_INT, first[0], w->comm);
    MPI_Bcast(msg, sizeof msg, MPI_CHAR, first[0], w->comm);
    return st_fail(code, "%s", msg);
}

/* The memory side of a write: the caller's data itself when the range is whole rows, else a
 * window of whole rows with the data copied in at its lead (see st_ckpt_select_range). */
static const float *write_window(const float *data, size_t count, size_t lead, size_t window, float **bounce) {
    *bounce = NULL;
    if (window == 0) {
        static const float dummy = 0;
        return &dummy;
    }
    if (lead == 0 && window == count) return data;
    *bounce = malloc(window * sizeof(float));
    if (*bounce) memcpy(*bounce + lead, data, count * sizeof(float));
    return *bounce;
}

/* One dataset being written: its handle, kept open until the checksums are summed across ranks. */
typedef struct {
    hid_t ds;
    uint64_t sum; /* this rank's part of the tensor's checksum */
    char label[160];
} dataset_out;

/* Creates float32 dataset `name` under `group` (contiguous, no filter: the per-tensor checksum is the
 * integrity check, see docs/checkpoint-format.md), with its step / hf_transposed attributes, and writes
 * the flat range [a, b) of it (data[0] = element a) with an independent transfer. out->sum is this rank's
 * checksum of that range, taken just before the write (the data is then in cache for the copy into the
 * page cache: one pass from memory). A local failure is returned but leaves every later metadata call
 * in place, so the ranks' collective metadata operations stay in step (see write_file). */
static int write_tensor(writer *w, hid_t group, const char *name, int ndim,
                        const int64_t shape[2], const float *data, uint64_t a, uint64_t b, int64_t step_attr,
                        int hf_transposed, int failed, dataset_out *out) {
    hsize_t dims[2] = {(hsize_t)shape[0], ndim == 2 ? (hsize_t)shape[1] : 1};
    int rc = 0;
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_layout(dcpl, H5D_CONTIGUOUS);
    H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY);
    H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
    hid_t fs = H5Screate_simple(ndim, dims, NULL);
    const char *label = out->label;
    out->sum = 0;
    out->ds = H5Dcreate2(group, name, H5T_IEEE_F32LE, fs, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    if (out->ds < 0) rc = st_fail(ST_EIO, "checkpoint %s: cannot create dataset %s: %s", w->path, label, st_ckpt_h5_reason());
    if (!rc && step_attr >= 0 && attr_i64(out->ds, "step", step_attr)) rc = st_fail(ST_EIO, "checkpoint %s: attribute of %s", w->path, label);
    if (!rc && hf_transposed && attr_i64(out->ds, "hf_transposed", 1)) rc = st_fail(ST_EIO, "checkpoint %s: attribute of %s", w->path, label);
    size_t count = b > a ? b - a : 0;
    if (!rc && !failed && count) {
        size_t lead, window;
        out->sum = st_ckpt_checksum(data, a, count);
        hid_t ms = st_ckpt_select_range(fs, ndim, shape, a, b, &lead, &window);
        float *bounce;
        const float *src = write_window(data, count, lead, window, &bounce);
        if (!src) rc = st_fail(ST_ENOMEM, "checkpoint %s: out of memory writing %s", w->path, label);
        else if (H5Dwrite(out->ds, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, src) < 0)
            rc = st_fail(ST_EIO, "checkpoint %s: writing %s failed: %s", w->path, label, st_ckpt_h5_reason());
        free(bounce);
        H5Sclose(ms);
    }
    H5Sclose(fs);
    return rc;
}

/* ---------------- root attributes ---------------- */

static int write_root(writer *w, const st_ckpt_meta *meta, int world) {
    hid_t f = w->file;
    int bad = attr_str(f, "format", ST_CKPT_FORMAT) || attr_i64(f, "version", ST_CKPT_VERSION) ||
              attr_i64(f, "step", meta->step) || attr_u64(f, "tokens_seen", meta->tokens_seen) ||
              attr_i64(f, "stage", meta->stage) || attr_i64(f, "world_size", world) ||
              attr_i64(f, "lr_step", meta->step) || attr_u64(f, "base_checksum", meta->base_checksum) ||
              attr_raw(f, "last_loss", H5T_NATIVE_DOUBLE, 0, &meta->last_loss) ||
              attr_str(f, "job_spec", meta->job_spec ? meta->job_spec : "") ||
              attr_str(f, "model_config", meta->model_config ? meta->model_config : "");
    if (!bad && meta->loader_words)
        bad = attr_raw(f, "loader_state", H5T_NATIVE_UINT64, meta->loader_words, meta->loader_state);
    if (!bad && meta->n_tasks > 0) {
        bad = attr_i64(f, "n_tasks", meta->n_tasks) ||
              attr_raw(f, "task_checksums", H5T_NATIVE_UINT64, (hsize_t)meta->n_tasks, meta->task_checksums);
        char *names = calloc((size_t)meta->n_tasks, 128);
        if (!names) return st_fail(ST_ENOMEM, "out of memory");
        for (int k = 0; k < meta->n_tasks; k++) snprintf(names + 128 * k, 128, "%s", meta->task_names[k]);
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, 128);
        H5Tset_strpad(t, H5T_STR_NULLTERM);
        if (!bad) bad = attr_raw(f, "task_names", t, (hsize_t)meta->n_tasks, names);
        H5Tclose(t);
        free(names);
    }
    if (!bad && meta->task_weighting_len > 0)
        bad = attr_raw(f, "task_weighting", H5T_NATIVE_DOUBLE, (hsize_t)meta->task_weighting_len, meta->task_weighting);
    return bad ? st_fail(ST_EIO, "checkpoint %s: writing root attributes failed: %s", w->path, st_ckpt_h5_reason()) : 0;
}

/* ---------------- the file ---------------- */

/* Every /model and /optim dataset of the snapshot, in registry order; returns the first local failure.
 * After one, this rank still makes every later metadata call (with nothing written), so the collective
 * metadata of all ranks stays in step until the one agreement that follows. */
static int write_tensors(writer *w, const st_ckpt_snap *s, hid_t gm, hid_t go, dataset_out *out) {
    int rc = 0, e;
    for (int i = 0; i < s->n; i++) {
        const st_ckpt_snap_param *p = &s->p[i];
        dataset_out *o = &out[3 * i];
        if (p->skip) continue; /* the frozen base: only its checksum is kept */
        snprintf(o[0].label, sizeof o[0].label, "model/%s", p->name);
        snprintf(o[1].label, sizeof o[1].label, "optim/%s/exp_avg", p->name);
        snprintf(o[2].label, sizeof o[2].label, "optim/%s/exp_avg_sq", p->name);
        float *wide = NULL; /* a tensor held in bf16 only: this rank's range widened for the write (exact) */
        if (p->w16 && p->mb > p->ma && !(wide = malloc((p->mb - p->ma) * sizeof(float))) && !rc)
            rc = st_fail(ST_ENOMEM, "checkpoint %s: out of memory writing %s", w->path, o[0].label);
        for (size_t k = 0; wide && k < p->mb - p->ma; k++) wide[k] = st_bf16_bits_to_float(p->w16[k]);
        e = write_tensor(w, gm, p->name, p->ndim, p->shape, p->w16 ? wide : p->w, p->ma, p->mb, -1, p->transposed,
                         rc, &o[0]);
        free(wide);
        rc = rc ? rc : e;
        if (!p->trainable) continue;
        hid_t g = H5Gcreate2(go, p->name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (g < 0 && !rc) rc = st_fail(ST_EIO, "checkpoint %s: cannot create group optim/%s", w->path, p->name);
        e = write_tensor(w, g, "exp_avg", p->ndim, p->shape, p->m, p->oa, p->ob, p->step, 0, rc, &o[1]);
        rc = rc ? rc : e;
        e = write_tensor(w, g, "exp_avg_sq", p->ndim, p->shape, p->v, p->oa, p->ob, p->step, 0, rc, &o[2]);
        rc = rc ? rc : e;
        if (g >= 0) H5Gclose(g);
    }
    return rc;
}

/* The whole tensors' checksums (one reduction of every rank's parts), as each dataset's attribute. */
static int write_checksums(writer *w, const st_ckpt_snap *s, dataset_out *out) {
    size_t n = 3 * (size_t)s->n;
    uint64_t *sums = malloc((n + 1) * sizeof *sums);
    int rc = agree(w, sums ? 0 : st_fail(ST_ENOMEM, "out of memory writing a checkpoint"));
    if (rc) { free(sums); return rc; }
    for (size_t k = 0; k < n; k++) sums[k] = out[k].sum;
    MPI_Allreduce(MPI_IN_PLACE, sums, (int)n, MPI_UINT64_T, MPI_SUM, w->comm);
    for (size_t k = 0; k < n; k++)
        if (out[k].ds > 0 && !rc && attr_u64(out[k].ds, "checksum", sums[k]))
            rc = st_fail(ST_EIO, "checkpoint %s: checksum attribute of %s: %s", w->path, out[k].label, st_ckpt_h5_reason());
    free(sums);
    return rc;
}

static int write_file(writer *w, const st_ckpt_snap *s) {
    dataset_out *out = calloc(3 * (size_t)s->n + 1, sizeof *out);
    int rc = agree(w, out ? 0 : st_fail(ST_ENOMEM, "out of memory writing a checkpoint"));
    if (rc) { free(out); return rc; }
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, w->comm, MPI_INFO_NULL);
    /* every rank makes every metadata call anyway: let HDF5 treat them (and the flush) as collective */
    H5Pset_all_coll_metadata_ops(fapl, 1);
    H5Pset_coll_metadata_write(fapl, 1);
    /* metadata packed into 1 MiB blocks; tensor data starts on 4 KiB pages (whole-page writes) */
    H5Pset_meta_block_size(fapl, 1 << 20);
    H5Pset_alignment(fapl, 1 << 16, 1 << 12);
    w->file = H5Fcreate(w->path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    rc = w->file < 0 ? st_fail(ST_EIO, "checkpoint %s: cannot create: %s", w->path, st_ckpt_h5_reason()) : 0;
    if ((rc = agree(w, rc))) { free(out); return rc; }
    rc = write_root(w, &s->meta, w->world);
    if (!rc && s->adapters && attr_u64(w->file, "adapter_base_checksum", s->adapter_base_checksum))
        rc = st_fail(ST_EIO, "checkpoint %s: writing adapter_base_checksum failed: %s", w->path, st_ckpt_h5_reason());
    hid_t gm = H5Gcreate2(w->file, "model", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t go = H5Gcreate2(w->file, "optim", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (!rc && (gm < 0 || go < 0)) rc = st_fail(ST_EIO, "checkpoint %s: cannot create groups: %s", w->path, st_ckpt_h5_reason());
    if ((rc = agree(w, rc)) == 0) rc = agree(w, write_tensors(w, s, gm, go, out));
    if (!rc) rc = agree(w, write_checksums(w, s, out));
    for (int k = 0; k < 3 * s->n; k++)
        if (out[k].ds > 0) H5Dclose(out[k].ds);
    free(out);
    if (gm >= 0) H5Gclose(gm);
    if (go >= 0) H5Gclose(go);
    herr_t closed = H5Fclose(w->file);
    if (!rc && closed < 0) rc = st_fail(ST_EIO, "checkpoint %s: closing failed: %s", w->path, st_ckpt_h5_reason());
    return agree(w, rc);
}

/* Rank 0, before any collective HDF5 call: reserves the file's estimated size. A write that fails
 * half-way inside a collective filtered H5Dwrite can leave the other ranks waiting in HDF5's own
 * collectives, so a full disk (or a file size limit) is detected here, up front, with a clear line.
 * Best effort: space freed and taken by others between this check and the write is not covered.
 * fallocate(2), not posix_fallocate(3): where the filesystem cannot allocate without writing
 * (NFS, ZFS, ...) glibc's fallback writes a byte into every block of the file, which costs as much
 * as the checkpoint itself. There the free space and the file size limit are checked instead. */
static int reserve_space(const char *partial, const st_ckpt_snap *s, const st_ckpt_meta *meta) {
    uint64_t n_sets = (uint64_t)s->n * 3;
    uint64_t bytes = 4 * (s->n_weights + 2 * s->n_grads) + 8192 * n_sets + (1u << 18) +
                     strlen(meta->job_spec ? meta->job_spec : "") + strlen(meta->model_config ? meta->model_config : "");
    bytes += bytes / 50;
    int fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return st_fail(ST_EIO, "checkpoint %s: cannot create: %s", partial, strerror(errno));
    int e = fallocate(fd, 0, 0, (off_t)bytes) == 0 ? 0 : errno;
    if (e == EOPNOTSUPP || e == ENOSYS) {
        struct statvfs fs;
        struct rlimit lim;
        e = 0;
        if (fstatvfs(fd, &fs) == 0 && (uint64_t)fs.f_bavail * fs.f_frsize < bytes) e = ENOSPC;
        if (!e && getrlimit(RLIMIT_FSIZE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < bytes) e = EFBIG;
    }
    close(fd);
    if (e == 0) return 0;
    unlink(partial);
    return st_fail(ST_EIO, "checkpoint %s: cannot reserve %.1f MB: %s (disk full or file size limit)", partial,
                   bytes / 1e6, strerror(e));
}

/* Test hook (tests only): ST_TEST_CKPT_SLOW_MS holds every rank for that long with the partial file
 * written and not yet committed, so a test can kill the job in the middle of a (background) write. */
static void test_delay(void) {
    const char *e = getenv("ST_TEST_CKPT_SLOW_MS");
    long ms = e ? strtol(e, NULL, 10) : 0;
    if (ms > 0) usleep((useconds_t)ms * 1000);
}

static void paths(const char *dir, const st_ckpt_snap *s, char name[ST_CKPT_NAME_MAX], char *path, size_t path_len,
                  char *partial, size_t partial_len) {
    snprintf(name, ST_CKPT_NAME_MAX, "step-%08lld.h5", (long long)s->meta.step);
    snprintf(path, path_len, "%s/%s", dir, name);
    snprintf(partial, partial_len, "%s.partial", path);
}

int st_ckpt_prepare(MPI_Comm comm, const char *dir, const st_ckpt_snap *s) {
    writer w = {.comm = comm};
    MPI_Comm_rank(comm, &w.rank);
    MPI_Comm_size(comm, &w.world);
    char name[ST_CKPT_NAME_MAX], path[1200], partial[1300];
    paths(dir, s, name, path, sizeof path, partial, sizeof partial);
    int rc = w.rank != s->rank || w.world != s->world
                 ? st_fail(ST_EINVAL, "checkpoint: the snapshot was taken on another communicator")
                 : 0;
    if (!rc && w.rank == 0) {
        rc = st_mkdirs(dir);
        if (rc) rc = st_fail_context(rc, "checkpoint dir");
        else st_ckpt_remove_partials(dir);
        if (!rc) rc = reserve_space(partial, s, &s->meta);
    }
    return agree(&w, rc);
}

int st_ckpt_write_prepared(MPI_Comm comm, const char *dir, const st_ckpt_snap *s, int keep_last, char *name_out,
                           double *write_seconds) {
    st_h5_lock();
    st_ckpt_h5_quiet();
    double t0 = st_now();
    writer w = {.comm = comm};
    MPI_Comm_rank(comm, &w.rank);
    MPI_Comm_size(comm, &w.world);
    char name[ST_CKPT_NAME_MAX], path[1200], partial[1300];
    paths(dir, s, name, path, sizeof path, partial, sizeof partial);
    w.path = partial;
    int rc = write_file(&w, s);
    if (!rc) test_delay();
    if (w.rank == 0) {
        if (!rc) rc = st_ckpt_commit_file(dir, partial, path);
        if (!rc) rc = st_ckpt_write_latest(dir, name);
        if (rc) unlink(partial);
        else st_ckpt_retain(dir, keep_last, name);
    }
    rc = agree(&w, rc);
    st_h5_unlock();
    if (!rc && name_out) snprintf(name_out, ST_CKPT_NAME_MAX, "%s", name);
    if (write_seconds) *write_seconds = st_now() - t0;
    return rc;
}

int st_ckpt_write_snapshot(MPI_Comm comm, const char *dir, const st_ckpt_snap *s, int keep_last, char *name_out,
                           double *write_seconds) {
    double t0 = st_now();
    int rc = st_ckpt_prepare(comm, dir, s);
    if (!rc) rc = st_ckpt_write_prepared(comm, dir, s, keep_last, name_out, NULL);
    if (write_seconds) *write_seconds = st_now() - t0;
    return rc;
}

int st_ckpt_save(MPI_Comm comm, const char *dir, const st_model *m, const st_optim *o, const st_ckpt_meta *meta,
                 int keep_last, char *name_out, double *write_seconds) {
    double t0 = st_now();
    st_ckpt_snap *s = NULL;
    int rc = st_ckpt_snapshot(comm, m, o, meta, 0, &s);
    if (!rc) rc = st_ckpt_write_snapshot(comm, dir, s, keep_last, name_out, NULL);
    st_ckpt_snap_free(s);
    if (write_seconds) *write_seconds = st_now() - t0;
    return rc;
}
