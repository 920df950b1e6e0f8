/* monitor_rules.h — the coordinator's decisions as pure functions (no sockets, no clocks):
 * stall detection, straggler detection, and validation of control requests.
 * Time is always passed in (seconds on any monotonic clock), so tests inject it.
 * Nothing here allocates except st_control_decide, which frees what it unpacks. */
#ifndef ST_MONITOR_RULES_H
#define ST_MONITOR_RULES_H

#include <stddef.h>
#include <stdint.h>

/* ---- stalls ---- */

/* What the coordinator remembers about one rank, updated from its heartbeats. */
typedef struct {
    int rank;
    char host[64];
    int64_t step;
    int phase;
    double phase_seconds; /* as reported in the last heartbeat */
    double heard_at;      /* coordinator clock when the last heartbeat arrived (start time if never) */
    int heard;            /* 0 until the first heartbeat */
    int alert;            /* ST_STALL_* currently raised for this rank (0: none) */
} st_rank_state;

enum { ST_STALL_NONE = 0, ST_STALL_SILENT = 1, ST_STALL_STUCK = 2 };

/* Updates a rank's state from a heartbeat received at `now`. */
void st_rank_heard(st_rank_state *r, const char *host, int64_t step, int phase, double phase_seconds,
                   double now);

/* Classifies a rank at `now`:
 *   ST_STALL_SILENT when no heartbeat arrived for more than stall_after_s (process stopped, dead,
 *                   or network gone);
 *   ST_STALL_STUCK  when heartbeats arrive but the worker has been in one phase (other than idle)
 *                   for more than stall_after_s as reported by its last heartbeat (hung collective,
 *                   deadlock, slow storage). Silence wins: a stopped process is silent, not stuck.
 * *seconds gets how long (silence, or reported time in phase). */
int st_stall_check(const st_rank_state *r, double now, double stall_after_s, double *seconds);

/* One line for an Alert's text, e.g.
 * "rank 3 on host n7 stuck in comm at step 1042 for 31 s". */
void st_stall_text(const st_rank_state *r, int kind, double seconds, char *out, size_t outsz);

/* ---- stragglers ---- */

#define ST_STRAGGLER_FACTOR 1.5
#define ST_STRAGGLER_STEPS 5

/* Lower median of n values (the middle one for odd n, the smaller middle one for even n, so that
 * with two ranks the faster one is the reference). n >= 1. Does not modify `v`. */
double st_median(const double *v, int n);

/* Feeds one completed step's per-rank step times. consecutive[r] counts steps in a row where rank r
 * took more than ST_STRAGGLER_FACTOR x the median; flagged[r] is set to 1 on the step it reaches
 * ST_STRAGGLER_STEPS (the alert moment) and to -1 on the step a flagged rank drops back under
 * (the recovery moment), 0 otherwise. `is_straggler[r]` keeps the raised state between calls. */
void st_straggler_update(const double *step_seconds, int n, int *consecutive, int *is_straggler,
                         int *flagged);

/* ---- control ---- */

#define ST_CTL_CHECKPOINT 1u
#define ST_CTL_STOP 2u
#define ST_CTL_PAUSE 4u
#define ST_CTL_RESUME 8u

#define ST_CONTROL_MAX_BYTES 4096
#define ST_TOKEN_HEX 32

/* Decodes and validates one control request. `job_token` is the 32-hex job token, or NULL/"" when
 * the job has none (then every state-changing command is refused).
 * Returns 1 when accepted, 0 when refused; sets *command (proto Command number, -1 if undecodable),
 * *bits (the ST_CTL_* bit to raise, 0 for STATUS or refusal) and a one-line reason in `why`. */
int st_control_decide(const void *buf, size_t len, const char *job_token, int *command, unsigned *bits,
                      char *why, size_t whysz);

/* "status", "checkpoint", ... ; "?" if unknown. */
const char *st_command_name(int command);
/* Inverse; -1 if unknown. */
int st_command_from_name(const char *name);

#endif
