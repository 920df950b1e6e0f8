/* ckpt_async.c — background checkpoint writes (see ckpt.h): the caller takes a snapshot, a thread
 * writes it with collective parallel HDF5 on a communicator of its own, one write at a time.
 *
 * Why a thread with MPI_Comm_dup: the HDF5 write is collective (MPI-IO), and the training thread goes
 * on with its own collectives on the training communicator. Two threads in MPI calls at once need
 * MPI_THREAD_MULTIPLE (Open MPI 4.1 here provides it); collectives of the two threads never mix
 * because they run on different communicators. HDF5 (Debian's parallel build) is not thread-safe,
 * so the writer holds st_h5_lock (common/util.h) for the whole write and every other HDF5 user takes it too.
 * The writer's error message is thread-local (st_error), so it is carried back as text. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "common/util.h"

struct st_ckpt_async {
    MPI_Comm comm;   /* the writer's own communicator */
    pthread_t thread;
    int pending;     /* started, not collected */
    volatile int finished;
    st_ckpt_snap *snap;
    float *buf;      /* the snapshot's copy, kept from save to save */
    size_t buf_cap;
    char dir[1024];
    int keep_last;
    /* the result */
    int rc;
    char name[ST_CKPT_NAME_MAX], msg[1024];
    double seconds;
};

int st_ckpt_async_init(MPI_Comm comm, st_ckpt_async **out) {
    *out = NULL;
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    if (level < MPI_THREAD_MULTIPLE)
        return st_fail(ST_EINVAL, "checkpoint.async needs MPI_THREAD_MULTIPLE, which this MPI does not provide "
                                  "(set checkpoint.async: false)");
    st_ckpt_async *a = calloc(1, sizeof *a);
    int rc = a ? 0 : st_fail(ST_ENOMEM, "out of memory"), worst;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MIN, comm);
    if (worst) { free(a); return rc ? rc : st_fail(worst, "out of memory on another rank"); }
    MPI_Comm_dup(comm, &a->comm);
    *out = a;
    return 0;
}

static void *writer_main(void *arg) {
    st_ckpt_async *a = arg;
    a->rc = st_ckpt_write_prepared(a->comm, a->dir, a->snap, a->keep_last, a->name, &a->seconds);
    if (a->rc) snprintf(a->msg, sizeof a->msg, "%s", st_error());
    __atomic_store_n(&a->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

int st_ckpt_async_start(st_ckpt_async *a, const char *dir, const st_model *m, const st_optim *o,
                        const st_ckpt_meta *meta, int keep_last, double *blocked_seconds) {
    double t0 = st_now();
    if (a->pending) return st_fail(ST_EINVAL, "checkpoint: a background write is still pending");
    /* on the writer's communicator (same ranks as the training one; no write runs now) */
    int rc = st_ckpt_snapshot_reuse(a->comm, m, o, meta, 1, &a->buf, &a->buf_cap, &a->snap);
    if (!rc) rc = st_ckpt_prepare(a->comm, dir, a->snap); /* a full disk fails here, at the save step */
    if (rc) {
        st_ckpt_snap_free(a->snap);
        a->snap = NULL;
        return rc;
    }
    snprintf(a->dir, sizeof a->dir, "%s", dir);
    a->keep_last = keep_last;
    a->rc = 0;
    a->name[0] = a->msg[0] = 0;
    a->seconds = 0;
    a->finished = 0;
    if (pthread_create(&a->thread, NULL, writer_main, a) != 0) writer_main(a); /* no thread: write now */
    else a->pending = 1;
    if (!a->pending) a->pending = 2; /* written already; collected like a background one */
    if (blocked_seconds) *blocked_seconds = st_now() - t0;
    return 0;
}

int st_ckpt_async_running(const st_ckpt_async *a) {
    return a && a->pending == 1 && !__atomic_load_n(&a->finished, __ATOMIC_ACQUIRE);
}

int st_ckpt_async_pending(const st_ckpt_async *a) { return a && a->pending; }

int st_ckpt_async_wait(st_ckpt_async *a, int64_t *step, char *name_out, double *write_seconds) {
    if (step) *step = -1;
    if (!a || !a->pending) return 0;
    if (a->pending == 1) pthread_join(a->thread, NULL);
    a->pending = 0;
    if (step) *step = a->snap->meta.step;
    st_ckpt_snap_free(a->snap);
    a->snap = NULL;
    if (name_out) snprintf(name_out, ST_CKPT_NAME_MAX, "%s", a->name);
    if (write_seconds) *write_seconds = a->seconds;
    return a->rc ? st_fail(a->rc, "%s", a->msg) : 0;
}

void st_ckpt_async_free(st_ckpt_async *a) {
    if (!a) return;
    st_ckpt_async_wait(a, NULL, NULL, NULL);
    MPI_Comm_free(&a->comm);
    free(a->buf);
    free(a);
}
