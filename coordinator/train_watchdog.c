/* train_watchdog.c — the collective watchdog (train.collective_timeout_s).
 *
 * Every rank runs one thread that watches the (step, phase) the training loop last entered. A phase
 * that has not changed for the timeout means this rank waits in a collective for a peer that never
 * arrives (a stopped or lost process, a launcher that did not tear the job down). Rank 0 names the
 * ranks whose heartbeats are not at that step and phase (the monitor's table); the other ranks wait a
 * little longer so that rank 0's report normally comes first. Then MPI_Abort ends the whole job with
 * ST_EXIT_HUNG: the launcher requeues it and the last committed checkpoint is intact (a write in flight
 * is only a *.partial file). Compute phases never last the timeout on a healthy rank; a paused job is
 * exempt. */
#include "coordinator/train_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"
#include "common/util.h"
#include "coordinator/commands.h" /* ST_EXIT_HUNG */

struct st_watchdog {
    pthread_t thread;
    _Atomic int64_t step;
    _Atomic int phase;
    _Atomic int64_t since_ns; /* CLOCK_MONOTONIC of the last step/phase change */
    _Atomic int paused, stopping;
    double timeout_s;
    double silent_s;          /* a rank without a heartbeat this long is not alive (10 heartbeats, >= 2 s) */
    int rank, world;
    st_monitor *mon;          /* rank 0: who is missing */
    char ckpt_dir[ST_CFG_PATH_MAX];
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void fire(st_watchdog *w, int64_t step, int phase, double waited) {
    char missing[1024] = "";
    int n = -1;
    if (w->mon) n = st_monitor_missing_ranks(w->mon, w->rank, step, phase, w->silent_s, missing, sizeof missing);
    char who[1200];
    if (n > 0) snprintf(who, sizeof who, "rank%s that never arrived: %s", n == 1 ? "" : "s", missing);
    else if (n == 0) snprintf(who, sizeof who, "every rank reports this phase: the collective itself is stuck (network?)");
    else if (w->rank == 0) snprintf(who, sizeof who, "which ranks never arrived is unknown (monitoring is off)");
    else snprintf(who, sizeof who, "rank 0, which tracks the others, has not aborted the job either: it is likely one of them");
    fprintf(stderr, "shardtune train: error: rank %d: collective timeout: %s of step %lld not complete after %.0f s "
                    "(train.collective_timeout_s %g); %s; aborting the job (exit %d); the last checkpoint in %s is intact\n",
            w->rank, st_phase_name(phase), (long long)step, waited, w->timeout_s, who, ST_EXIT_HUNG, w->ckpt_dir);
    fflush(stderr);
    if (w->mon) {
        st_monitor_event(w->mon, "collective_timeout", step, "%s of step %lld not complete after %.0f s; %s",
                         st_phase_name(phase), (long long)step, waited, who);
        struct timespec pause = {0, 300 * 1000000L}; /* let the monitor thread publish it */
        nanosleep(&pause, NULL);
    }
    MPI_Abort(MPI_COMM_WORLD, ST_EXIT_HUNG);
}

static void *watch(void *arg) {
    st_watchdog *w = arg;
    /* the other ranks leave rank 0 time to name the missing ones first */
    double grace = w->rank == 0 ? 0 : (w->timeout_s * 0.2 < 2 ? 2 : w->timeout_s * 0.2 > 30 ? 30 : w->timeout_s * 0.2);
    double limit = w->timeout_s + grace;
    long tick_ms = (long)(w->timeout_s * 100) < 1000 ? (long)(w->timeout_s * 100) : 1000;
    if (tick_ms < 20) tick_ms = 20;
    while (!atomic_load(&w->stopping)) {
        struct timespec ts = {tick_ms / 1000, (tick_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        if (atomic_load(&w->paused)) continue;
        int64_t since = atomic_load(&w->since_ns);
        double waited = (now_ns() - since) / 1e9;
        if (waited >= limit && !atomic_load(&w->stopping))
            fire(w, atomic_load(&w->step), atomic_load(&w->phase), waited);
    }
    return NULL;
}

int st_watchdog_start(trainer *t) {
    const st_config *c = t->cfg;
    if (!(c->train.collective_timeout_s > 0)) return 0;
    st_watchdog *w = calloc(1, sizeof *w);
    if (!w) return st_fail(ST_ENOMEM, "out of memory");
    atomic_init(&w->step, 0);
    atomic_init(&w->phase, ST_PHASE_IDLE);
    atomic_init(&w->since_ns, now_ns());
    atomic_init(&w->paused, 0);
    atomic_init(&w->stopping, 0);
    w->timeout_s = c->train.collective_timeout_s;
    w->silent_s = 10 * c->monitor.heartbeat_ms / 1000.0 > 2 ? 10 * c->monitor.heartbeat_ms / 1000.0 : 2;
    w->rank = t->rank;
    w->world = t->world;
    w->mon = t->mon;
    snprintf(w->ckpt_dir, sizeof w->ckpt_dir, "%s", c->checkpoint.dir);
    if (pthread_create(&w->thread, NULL, watch, w) != 0) {
        free(w);
        return st_fail(ST_EIO, "cannot start the collective watchdog thread");
    }
    t->wd = w;
    return 0;
}

void st_watchdog_mark(st_watchdog *w, int64_t step, int phase) {
    if (!w) return;
    atomic_store(&w->since_ns, now_ns());
    atomic_store(&w->step, step);
    atomic_store(&w->phase, phase);
}

void st_watchdog_pause(st_watchdog *w, int paused) {
    if (!w) return;
    atomic_store(&w->since_ns, now_ns());
    atomic_store(&w->paused, paused);
}

void st_watchdog_stop(st_watchdog *w) {
    if (!w) return;
    atomic_store(&w->stopping, 1);
    pthread_join(w->thread, NULL);
    free(w);
}
