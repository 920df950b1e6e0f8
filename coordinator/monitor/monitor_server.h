/* monitor_server.h — the coordinator side of telemetry (rank 0 only): one thread that owns
 *   PULL  (bind, internal)        heartbeats and step reports from every rank's telemetry thread,
 *   PUB   (bind, monitor.publish) multipart [topic, message]: "step" StepSummary, "rank" Heartbeat,
 *                                 "event" Event, "alert" Alert,
 *   REP   (bind, monitor.control) ControlRequest -> ControlReply.
 * With opts.curve the PUB and REP sockets are CURVE servers (encrypted, the job authenticated by its
 * public key RUN_DIR/monitor.pub); PULL stays plain (internal, see docs/telemetry.md).
 * It aggregates StepReports into one StepSummary per step once every rank reported that step,
 * raises stall/straggler alerts (monitor_rules.h) and turns accepted control requests into a
 * pending control word the training loop takes at each step boundary.
 *
 * The training loop never touches the sockets: st_monitor_event() queues under a mutex and wakes
 * the thread through an eventfd; st_monitor_take_control() is one atomic exchange.
 * Memory: st_monitor_start() allocates the handle; st_monitor_stop() joins and frees it.
 * Strings in the options are copied (the CURVE secret only into the sockets, never kept or logged).
 * Protocol: docs/telemetry.md. */
#ifndef ST_MONITOR_SERVER_H
#define ST_MONITOR_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/monitor/monitor_rules.h" /* ST_CTL_* bits */

typedef struct {
    const char *pull_bind;     /* NULL: "tcp://127.0.0.1:*" (a free loopback port). Multi-node jobs pass
                                  "tcp://0.0.0.0:*"; st_monitor_pull_endpoint then names this host. */
    const char *publish_addr;  /* monitor.publish, e.g. "tcp://127.0.0.1:5555" (bound) */
    const char *control_addr;  /* monitor.control, e.g. "tcp://127.0.0.1:5556" (bound) */
    const char *token;         /* the job's 32-hex control token (control_token.h); NULL: refuse all
                                  state-changing commands */
    int curve;                 /* 1: PUB and REP are CURVE servers (monitor.curve) */
    const char *curve_secret_z85; /* with curve: the server secret key, 40 Z85 chars (control_token.h) */
    int world_size;
    double stall_after_s;      /* <= 0: 30 */
} st_monitor_opts;

typedef struct st_monitor st_monitor;

/* Binds the three sockets and starts the thread. 0, or ST_ECOMM naming the address that failed
 * (e.g. "address already in use"). */
int st_monitor_start(const st_monitor_opts *opts, st_monitor **out);

/* The address ranks connect their telemetry to (st_telemetry_opts.coordinator_addr), e.g.
 * "tcp://127.0.0.1:41234". Owned by the handle. Rank 0 MPI_Bcasts it to the other ranks. */
const char *st_monitor_pull_endpoint(const st_monitor *m);

/* For the collective watchdog (any thread): the ranks whose last heartbeat is not at (step, phase) or is
 * older than silent_s (a stopped process), as "R (host H, last seen at step S in PHASE, N s ago), ..." in
 * out (`self`, the caller's rank, is never listed); returns their count. */
int st_monitor_missing_ranks(st_monitor *m, int self, int64_t step, int phase, double silent_s, char *out, size_t size);

/* The addresses PUB and REP actually bound (a "*" port resolved), "" for a socket that is off. Any thread:
 * copies taken before the monitor thread started (its sockets are used by that thread only). */
void st_monitor_bound(const st_monitor *m, char *publish, char *control, size_t size);

/* Publishes an Event on topic "event" (kind: start, end, stop, resume, stage_change,
 * checkpoint_saved, checkpoint_failed, ...). Never blocks on the network. */
void st_monitor_event(st_monitor *m, const char *kind, int64_t step, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Returns and clears the pending control word (ST_CTL_* bits accepted since the last call).
 * The loop calls it on rank 0 at each step boundary and broadcasts the result itself. */
unsigned st_monitor_take_control(st_monitor *m);

/* Counters for logs and tests. */
typedef struct {
    uint64_t heartbeats, reports, summaries, alerts, events;
    uint64_t bad_messages;     /* undecodable or out-of-range rank messages */
    uint64_t control_ok, control_refused;
    uint64_t dropped_steps;    /* steps evicted before every rank reported */
} st_monitor_stats;
void st_monitor_get_stats(st_monitor *m, st_monitor_stats *out);

/* Publishes queued events, stops and joins the thread, closes sockets (short linger), frees. */
void st_monitor_stop(st_monitor *m);

#endif
