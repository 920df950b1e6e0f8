/* telemetry.c — rank-side telemetry thread (see telemetry.h).
 *
 * The thread waits in zmq_poll on its mailbox's wake-up (mailbox.h: st_telemetry_report and stop), so a report
 * leaves within microseconds and heartbeats go out on time without busy polling. */
#include "coordinator/monitor/telemetry.h"

#include "common/error.h"
#include "coordinator/monitor/mailbox.h"
#include "shardtune.pb-c.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

_Static_assert((int)ST_PHASE_COMM == (int)SHARDTUNE__PHASE__PHASE_COMM, "st_phase must match proto Phase");
_Static_assert((int)ST_PHASE_EVAL == (int)SHARDTUNE__PHASE__PHASE_EVAL, "st_phase must match proto Phase");

static const char *const st_phase_names[ST_PHASE_COUNT] = {
    "idle", "data", "forward", "backward", "comm", "optimizer", "checkpoint", "eval"};

const char *st_phase_name(int phase) {
    return phase >= 0 && phase < ST_PHASE_COUNT ? st_phase_names[phase] : "?";
}

int st_phase_from_name(const char *name) {
    for (int i = 0; i < ST_PHASE_COUNT; i++)
        if (!strcmp(name, st_phase_names[i])) return i;
    return -1;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void st_probe_init(st_probe *p) {
    atomic_init(&p->step, 0);
    atomic_init(&p->phase, ST_PHASE_IDLE);
    atomic_init(&p->phase_start_ns, mono_ns());
}

void st_probe_set_step(st_probe *p, int64_t step) {
    atomic_store_explicit(&p->step, step, memory_order_relaxed);
}

void st_probe_set_phase(st_probe *p, st_phase phase) {
    atomic_store_explicit(&p->phase_start_ns, mono_ns(), memory_order_relaxed);
    atomic_store_explicit(&p->phase, (int)phase, memory_order_release);
}

uint64_t st_rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    unsigned long long size = 0, resident = 0;
    int n = fscanf(f, "%llu %llu", &size, &resident);
    fclose(f);
    if (n != 2) return 0;
    long page = sysconf(_SC_PAGESIZE);
    return (uint64_t)resident * (uint64_t)(page > 0 ? page : 4096);
}

int st_zmq_socket_defaults(void *sock, int linger_ms) {
    int ivl = 1000, timeout = 5000, ttl = 5000;
    if (zmq_setsockopt(sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms) != 0 ||
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl) != 0 ||
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout) != 0 ||
        zmq_setsockopt(sock, ZMQ_HEARTBEAT_TTL, &ttl, sizeof ttl) != 0)
        return st_fail(ST_ECOMM, "zmq_setsockopt: %s", zmq_strerror(zmq_errno()));
    return 0;
}

struct st_telemetry {
    st_probe probe;
    int rank, heartbeat_ms;
    char host[256];
    char job_id[128];
    void *ctx, *push;
    pthread_t thread;
    atomic_bool stopping;
    atomic_uint_fast64_t dropped;
    st_mailbox reports; /* step reports from the training loop (bounded: a full one drops) */
};

int st_telemetry_report(st_telemetry *t, const st_step_report *r) {
    if (st_mailbox_put(&t->reports, r)) {
        atomic_fetch_add(&t->dropped, 1);
        return 1;
    }
    return 0;
}

uint64_t st_telemetry_dropped(st_telemetry *t) { return atomic_load(&t->dropped); }

st_probe *st_telemetry_probe(st_telemetry *t) { return &t->probe; }

/* Serializes with protobuf-c into a stack/heap buffer and sends without blocking.
 * A full PUSH pipe (coordinator gone or slow) drops the message: telemetry must never stall a rank. */
static void send_packed(st_telemetry *t, const char *kind, const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    unsigned char stackbuf[2048];
    unsigned char *buf = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!buf) return;
    protobuf_c_message_pack(m, buf);
    /* Multipart [kind, message] is delivered whole or not at all. */
    if (zmq_send(t->push, kind, strlen(kind), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(t->push, buf, n, ZMQ_DONTWAIT) < 0)
        atomic_fetch_add(&t->dropped, 1);
    if (buf != stackbuf) free(buf);
}

static void send_heartbeat(st_telemetry *t) {
    Shardtune__Heartbeat hb = SHARDTUNE__HEARTBEAT__INIT;
    hb.version = 1;
    hb.rank = t->rank;
    hb.host = t->host;
    hb.step = atomic_load_explicit(&t->probe.step, memory_order_relaxed);
    hb.phase = (Shardtune__Phase)atomic_load_explicit(&t->probe.phase, memory_order_acquire);
    int64_t start = atomic_load_explicit(&t->probe.phase_start_ns, memory_order_relaxed);
    double secs = (double)(mono_ns() - start) * 1e-9;
    hb.phase_seconds = secs > 0 ? secs : 0;
    hb.rss_bytes = st_rss_bytes();
    hb.pid = (int32_t)getpid();
    hb.job_id = t->job_id;
    hb.dropped_reports = atomic_load(&t->dropped);
    send_packed(t, ST_KIND_HEARTBEAT, &hb.base);
}

static void send_report(st_telemetry *t, const st_step_report *r) {
    Shardtune__StepReport m = SHARDTUNE__STEP_REPORT__INIT;
    m.version = 1;
    m.rank = t->rank;
    m.step = r->step;
    m.loss = r->loss;
    m.step_seconds = r->step_seconds;
    m.comm_seconds = r->comm_seconds;
    m.tokens = r->tokens;
    m.grad_norm = r->grad_norm;
    m.lr = r->lr;
    m.mfu = r->mfu;
    m.stage = r->stage;
    int n = r->ntasks < 0 ? 0 : r->ntasks > ST_TELEMETRY_MAX_TASKS ? ST_TELEMETRY_MAX_TASKS : r->ntasks;
    Shardtune__StepReport__TaskLossEntry le[ST_TELEMETRY_MAX_TASKS], *lp[ST_TELEMETRY_MAX_TASKS];
    Shardtune__StepReport__TaskTokensEntry te[ST_TELEMETRY_MAX_TASKS], *tp[ST_TELEMETRY_MAX_TASKS];
    char names[ST_TELEMETRY_MAX_TASKS][ST_TELEMETRY_TASK_NAME];
    for (int i = 0; i < n; i++) {
        memcpy(names[i], r->task_name[i], ST_TELEMETRY_TASK_NAME);
        names[i][ST_TELEMETRY_TASK_NAME - 1] = 0; /* the caller's copy may lack a terminator */
        shardtune__step_report__task_loss_entry__init(&le[i]);
        le[i].key = names[i];
        le[i].value = r->task_loss[i];
        lp[i] = &le[i];
        shardtune__step_report__task_tokens_entry__init(&te[i]);
        te[i].key = names[i];
        te[i].value = r->task_tokens[i];
        tp[i] = &te[i];
    }
    m.n_task_loss = m.n_task_tokens = (size_t)n;
    m.task_loss = lp;
    m.task_tokens = tp;
    send_packed(t, ST_KIND_REPORT, &m.base);
}

/* Sends every queued report; the copy happens outside the lock so the worker never waits on ZeroMQ. */
static void drain(st_telemetry *t) {
    st_step_report r;
    while (st_mailbox_take(&t->reports, &r)) send_report(t, &r);
}

static void *telemetry_main(void *arg) {
    st_telemetry *t = arg;
    double next_beat = 0;
    for (;;) {
        double now = (double)mono_ns() * 1e-9;
        if (now >= next_beat) {
            send_heartbeat(t);
            next_beat = now + t->heartbeat_ms * 1e-3;
        }
        drain(t);
        if (atomic_load(&t->stopping)) break;
        zmq_pollitem_t item = {.socket = NULL, .fd = st_mailbox_fd(&t->reports), .events = ZMQ_POLLIN, .revents = 0};
        long wait_ms = (long)((next_beat - now) * 1e3) + 1;
        if (wait_ms < 1) wait_ms = 1;
        if (zmq_poll(&item, 1, wait_ms) > 0 && (item.revents & ZMQ_POLLIN)) st_mailbox_drain_wake(&t->reports);
    }
    drain(t);
    send_heartbeat(t); /* the last state, so the monitor shows where the rank ended */
    return NULL;
}

static void destroy(st_telemetry *t) {
    if (t->push) zmq_close(t->push);
    if (t->ctx) zmq_ctx_term(t->ctx);
    st_mailbox_free(&t->reports);
    free(t);
}

int st_telemetry_start(const st_telemetry_opts *o, st_telemetry **out) {
    *out = NULL;
    if (!o || !o->coordinator_addr || !*o->coordinator_addr)
        return st_fail(ST_EINVAL, "telemetry: no coordinator address");
    st_telemetry *t = calloc(1, sizeof *t);
    if (!t) return st_fail(ST_ENOMEM, "telemetry: out of memory");
    st_mailbox_clear(&t->reports);
    st_probe_init(&t->probe);
    t->rank = o->rank;
    t->heartbeat_ms = o->heartbeat_ms > 0 ? o->heartbeat_ms : 500;
    if (gethostname(t->host, sizeof t->host - 1) != 0) snprintf(t->host, sizeof t->host, "unknown");
    snprintf(t->job_id, sizeof t->job_id, "%s", o->job_id ? o->job_id : "");
    int rc = st_mailbox_init(&t->reports, o->queue_capacity > 0 ? o->queue_capacity : 64, sizeof(st_step_report));
    t->ctx = zmq_ctx_new();
    if (rc || !t->ctx) {
        destroy(t);
        return st_fail(ST_ENOMEM, "telemetry: cannot allocate queue/eventfd/context on rank %d", o->rank);
    }
    zmq_ctx_set(t->ctx, ZMQ_IO_THREADS, 1);
    t->push = zmq_socket(t->ctx, ZMQ_PUSH);
    int hwm = 1000;
    if (!t->push || st_zmq_socket_defaults(t->push, 500) != 0 ||
        zmq_setsockopt(t->push, ZMQ_SNDHWM, &hwm, sizeof hwm) != 0 ||
        zmq_connect(t->push, o->coordinator_addr) != 0) {
        int e = zmq_errno();
        destroy(t);
        return st_fail(ST_ECOMM, "telemetry: rank %d cannot connect PUSH to %s: %s", o->rank,
                       o->coordinator_addr, zmq_strerror(e));
    }
    if (pthread_create(&t->thread, NULL, telemetry_main, t) != 0) {
        destroy(t);
        return st_fail(ST_EIO, "telemetry: cannot start thread on rank %d", o->rank);
    }
    *out = t;
    return 0;
}

void st_telemetry_stop(st_telemetry *t) {
    if (!t) return;
    atomic_store(&t->stopping, true);
    st_mailbox_wake(&t->reports);
    pthread_join(t->thread, NULL);
    destroy(t);
}
