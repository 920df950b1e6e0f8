/* monitor_rules.c — pure decision functions of the coordinator (see monitor_rules.h). */
#include "coordinator/monitor/monitor_rules.h"

#include "coordinator/monitor/telemetry.h"
#include "shardtune.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void st_rank_heard(st_rank_state *r, const char *host, int64_t step, int phase, double phase_seconds,
                   double now) {
    snprintf(r->host, sizeof r->host, "%s", host ? host : "");
    r->step = step;
    r->phase = phase;
    r->phase_seconds = phase_seconds;
    r->heard_at = now;
    r->heard = 1;
}

int st_stall_check(const st_rank_state *r, double now, double stall_after_s, double *seconds) {
    double silent = now - r->heard_at;
    if (silent > stall_after_s) {
        *seconds = silent;
        return ST_STALL_SILENT;
    }
    /* Only the reported time counts: extrapolating it across missing heartbeats would call a stopped
     * process "stuck" before it is "silent". Idle is where a paused or finished job waits: not a stall. */
    if (r->heard && r->phase != ST_PHASE_IDLE && r->phase_seconds > stall_after_s) {
        *seconds = r->phase_seconds;
        return ST_STALL_STUCK;
    }
    *seconds = 0;
    return ST_STALL_NONE;
}

void st_stall_text(const st_rank_state *r, int kind, double seconds, char *out, size_t outsz) {
    const char *host = r->host[0] ? r->host : "?";
    if (kind == ST_STALL_STUCK)
        snprintf(out, outsz, "rank %d on host %s stuck in %s at step %lld for %.0f s", r->rank, host,
                 st_phase_name(r->phase), (long long)r->step, seconds);
    else if (kind == ST_STALL_SILENT && r->heard)
        snprintf(out, outsz, "rank %d on host %s silent for %.0f s (last seen in %s at step %lld)", r->rank,
                 host, seconds, st_phase_name(r->phase), (long long)r->step);
    else if (kind == ST_STALL_SILENT)
        snprintf(out, outsz, "rank %d has sent no heartbeat in %.0f s since the coordinator started", r->rank,
                 seconds);
    else
        snprintf(out, outsz, "rank %d on host %s is healthy", r->rank, host);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double st_median(const double *v, int n) {
    double small[64];
    double *tmp = n <= 64 ? small : malloc((size_t)n * sizeof *tmp);
    if (!tmp) return v[0]; /* out of memory: any value keeps detection running */
    memcpy(tmp, v, (size_t)n * sizeof *tmp);
    qsort(tmp, (size_t)n, sizeof *tmp, cmp_double);
    double m = tmp[(n - 1) / 2];
    if (tmp != small) free(tmp);
    return m;
}

void st_straggler_update(const double *step_seconds, int n, int *consecutive, int *is_straggler,
                         int *flagged) {
    double med = st_median(step_seconds, n);
    for (int r = 0; r < n; r++) {
        flagged[r] = 0;
        if (step_seconds[r] > ST_STRAGGLER_FACTOR * med) {
            consecutive[r]++;
            if (consecutive[r] == ST_STRAGGLER_STEPS && !is_straggler[r]) {
                is_straggler[r] = 1;
                flagged[r] = 1;
            }
        } else {
            consecutive[r] = 0;
            if (is_straggler[r]) {
                is_straggler[r] = 0;
                flagged[r] = -1;
            }
        }
    }
}

static const char *const st_command_names[] = {"status", "checkpoint", "stop", "pause", "resume"};
#define ST_NCMD ((int)(sizeof st_command_names / sizeof st_command_names[0]))

const char *st_command_name(int command) {
    return command >= 0 && command < ST_NCMD ? st_command_names[command] : "?";
}

int st_command_from_name(const char *name) {
    for (int i = 0; i < ST_NCMD; i++)
        if (!strcmp(name, st_command_names[i])) return i;
    return -1;
}

/* Compares without an early exit so a remote peer cannot learn the token byte by byte from timing. */
static int token_equal(const char *given, const char *job) {
    size_t n = strlen(job);
    if (strlen(given) != n) return 0;
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)(given[i] ^ job[i]);
    return diff == 0;
}

int st_control_decide(const void *buf, size_t len, const char *job_token, int *command, unsigned *bits,
                      char *why, size_t whysz) {
    *command = -1;
    *bits = 0;
    if (len > ST_CONTROL_MAX_BYTES) {
        snprintf(why, whysz, "request of %zu bytes is larger than %d", len, ST_CONTROL_MAX_BYTES);
        return 0;
    }
    Shardtune__ControlRequest *req = shardtune__control_request__unpack(NULL, len, buf);
    if (!req) {
        snprintf(why, whysz, "malformed request (not a ControlRequest)");
        return 0;
    }
    int cmd = (int)req->command;
    int ok = 0;
    if (cmd < 0 || cmd >= ST_NCMD) {
        snprintf(why, whysz, "unknown command %d", cmd);
    } else {
        *command = cmd;
        const char *tok = req->token ? req->token : "";
        if (cmd == SHARDTUNE__COMMAND__STATUS) {
            ok = 1;
            snprintf(why, whysz, "status");
        } else if (!job_token || !*job_token) {
            snprintf(why, whysz, "%s refused: this job has no control token", st_command_name(cmd));
        } else if (!*tok) {
            snprintf(why, whysz, "%s refused: a token is required (--token-file or --run-dir)",
                     st_command_name(cmd));
        } else if (!token_equal(tok, job_token)) {
            snprintf(why, whysz, "%s refused: wrong token", st_command_name(cmd));
        } else {
            ok = 1;
            *bits = 1u << (cmd - 1); /* CHECKPOINT=1 -> bit 0, STOP -> bit 1, PAUSE -> 2, RESUME -> 3 */
            snprintf(why, whysz, "%s accepted: takes effect at the next step boundary", st_command_name(cmd));
        }
    }
    shardtune__control_request__free_unpacked(req, NULL);
    return ok;
}
