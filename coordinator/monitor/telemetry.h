/* telemetry.h — the rank side of telemetry: a background thread per rank that PUSHes a Heartbeat
 * every heartbeat_ms and a StepReport after every step to the coordinator (monitor_server.h).
 *
 * The worker never calls ZeroMQ and never blocks on telemetry. It only:
 *   - writes its step and phase into the st_probe (C11 atomics, lock-free), and
 *   - hands finished-step numbers to st_telemetry_report(), which copies them into a small bounded
 *     queue under a mutex and returns at once (a full queue drops the report and counts it).
 * The telemetry thread reads the probe, drains the queue, serializes protobuf and sends with
 * ZMQ_DONTWAIT. It never waits on MPI, so a rank hung in a collective still sends heartbeats.
 *
 * Memory: st_telemetry_start() allocates the handle; st_telemetry_stop() joins the thread and frees
 * it. Strings in the options are copied. */
#ifndef ST_TELEMETRY_H
#define ST_TELEMETRY_H

#include <stdatomic.h>
#include <stdint.h>

/* First frame of each rank -> coordinator message (the second is the serialized protobuf). */
#define ST_KIND_HEARTBEAT "heartbeat"
#define ST_KIND_REPORT "report"

/* Same numbers as proto enum shardtune.Phase. */
typedef enum {
    ST_PHASE_IDLE = 0,
    ST_PHASE_DATA = 1,
    ST_PHASE_FORWARD = 2,
    ST_PHASE_BACKWARD = 3,
    ST_PHASE_COMM = 4,
    ST_PHASE_OPTIMIZER = 5,
    ST_PHASE_CHECKPOINT = 6,
    ST_PHASE_EVAL = 7,
    ST_PHASE_COUNT
} st_phase;

/* "idle", "data", "forward", ... ("?" for an unknown number). */
const char *st_phase_name(int phase);
/* Inverse of st_phase_name; -1 if unknown. */
int st_phase_from_name(const char *name);

/* What the worker publishes; written by the worker thread, read by the telemetry thread.
 * The three fields are read independently: a heartbeat may pair a new phase with the previous
 * start time for one beat, which is harmless for monitoring and avoids any lock. */
typedef struct {
    _Atomic int64_t step;
    _Atomic int phase;
    _Atomic int64_t phase_start_ns; /* CLOCK_MONOTONIC */
} st_probe;

void st_probe_init(st_probe *p);
void st_probe_set_step(st_probe *p, int64_t step);
void st_probe_set_phase(st_probe *p, st_phase phase); /* also restarts the phase clock */

#define ST_TELEMETRY_MAX_TASKS 16
#define ST_TELEMETRY_TASK_NAME 48

/* One finished step as seen by this rank. Plain values, copied by st_telemetry_report(). */
typedef struct {
    int64_t step;
    double loss;          /* this rank's mean loss per target token */
    double step_seconds;
    double comm_seconds;
    uint64_t tokens;      /* target tokens this rank processed in the step */
    int ntasks;
    char task_name[ST_TELEMETRY_MAX_TASKS][ST_TELEMETRY_TASK_NAME];
    double task_loss[ST_TELEMETRY_MAX_TASKS];
    uint64_t task_tokens[ST_TELEMETRY_MAX_TASKS];
    /* Rank 0 only: copied into the StepSummary (other ranks leave 0). */
    double grad_norm, lr, mfu;
    int stage;
} st_step_report;

typedef struct {
    const char *coordinator_addr; /* the coordinator's PULL endpoint, e.g. from st_monitor_pull_endpoint */
    int rank;
    int heartbeat_ms;             /* <= 0: 500 */
    int queue_capacity;           /* <= 0: 64 step reports */
    const char *job_id;           /* optional, copied into heartbeats */
} st_telemetry_opts;

typedef struct st_telemetry st_telemetry;

/* Creates the ZeroMQ context and PUSH socket and starts the thread. 0 or ST_ECOMM / ST_EINVAL. */
int st_telemetry_start(const st_telemetry_opts *opts, st_telemetry **out);

/* The probe the worker writes (owned by the handle, valid until st_telemetry_stop). */
st_probe *st_telemetry_probe(st_telemetry *t);

/* Queues one step report without blocking. Returns 0, or 1 when the queue was full and the report
 * was dropped (counted, and sent in heartbeats as dropped_reports). Safe from any thread. */
int st_telemetry_report(st_telemetry *t, const st_step_report *r);

/* Reports dropped so far. */
uint64_t st_telemetry_dropped(st_telemetry *t);

/* Sends what is queued (bounded by a short linger), stops and joins the thread, frees. NULL is ok. */
void st_telemetry_stop(st_telemetry *t);

/* Resident set size of this process from /proc/self/statm (0 if unreadable). */
uint64_t st_rss_bytes(void);

/* Applies the options every long-lived shardtune TCP socket gets: small linger, ZMTP heartbeats.
 * `sock` is a void* ZeroMQ socket. Returns 0 or ST_ECOMM. */
int st_zmq_socket_defaults(void *sock, int linger_ms);

#endif
