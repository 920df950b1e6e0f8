/* telemetry_driver.c — drives the real telemetry API (telemetry.h, monitor_server.h) with fake training
 * steps, for tests/reference/test_telemetry_client.py and tests/integration/test_telemetry_cli.sh.
 *
 *   telemetry_driver --world N --steps S --step-ms X --run-dir D --publish ADDR --control ADDR
 *                    [--stall-after S] [--heartbeat-ms H] [--start-delay-ms D]
 *                    [--slow-rank R --slow-factor F] [--hang-rank R --hang-step S --hang-phase NAME --hang-s T]
 *
 * The first process is rank 0 and the coordinator: it creates RUN_DIR/control.token, starts the monitor
 * server, prints "PULL <endpoint>", then starts ranks 1..N-1 as child processes (this same program with
 * --rank R --pull ENDPOINT) and prints "RANK r PID p" for each, so a test can SIGSTOP one rank.
 * Every rank runs S steps through the phases data, forward, backward, comm, optimizer (step-ms split
 * evenly) and reports loss = 2 + 1/(1+step) + 0.1*rank with 100+10*rank tokens, tasks "a" (loss+0.5,
 * 60+10*rank tokens) and "b" (loss-0.5, 40 tokens); rank 0 adds grad_norm = 1 + 0.01*step and
 * lr = 0.001*(step+1). Rank 0 honours control words: CHECKPOINT -> event checkpoint_saved,
 * STOP -> event stop and SIGTERM to the other ranks, PAUSE/RESUME -> idle until resumed. */
#include "common/error.h"
#include "coordinator/monitor/control_token.h"
#include "coordinator/monitor/monitor_server.h"
#include "coordinator/monitor/telemetry.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int world, steps, step_ms, heartbeat_ms, start_delay_ms, rank;
    double stall_after, slow_factor, hang_s;
    int slow_rank, hang_rank, hang_step, hang_phase;
    const char *run_dir, *publish, *control, *pull;
} opts_t;

static volatile sig_atomic_t g_term;
static void on_term(int sig) { (void)sig; g_term = 1; }

static void sleep_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fill_report(const opts_t *o, int64_t step, double secs, st_step_report *r) {
    memset(r, 0, sizeof *r);
    r->step = step;
    r->loss = 2.0 + 1.0 / (1.0 + (double)step) + 0.1 * o->rank;
    r->tokens = 100 + 10 * (uint64_t)o->rank;
    r->step_seconds = secs;
    r->comm_seconds = secs / 5;
    r->ntasks = 2;
    snprintf(r->task_name[0], ST_TELEMETRY_TASK_NAME, "a");
    r->task_loss[0] = r->loss + 0.5;
    r->task_tokens[0] = 60 + 10 * (uint64_t)o->rank;
    snprintf(r->task_name[1], ST_TELEMETRY_TASK_NAME, "b");
    r->task_loss[1] = r->loss - 0.5;
    r->task_tokens[1] = 40;
    if (o->rank == 0) {
        r->grad_norm = 1.0 + 0.01 * (double)step;
        r->lr = 0.001 * (double)(step + 1);
        r->mfu = 0.25;
        r->stage = 1;
    }
}

/* Returns 1 when the loop must stop. */
static int rank0_control(st_monitor *mon, st_probe *p, int64_t step) {
    unsigned bits = st_monitor_take_control(mon);
    if (bits & ST_CTL_CHECKPOINT) {
        st_probe_set_phase(p, ST_PHASE_CHECKPOINT);
        sleep_s(0.02);
        st_monitor_event(mon, "checkpoint_saved", step, "checkpoint at step %lld (driver: nothing written)",
                         (long long)step);
    }
    if (bits & ST_CTL_STOP) {
        st_monitor_event(mon, "stop", step, "stop requested by control at step %lld", (long long)step);
        return 1;
    }
    if (bits & ST_CTL_PAUSE) {
        st_monitor_event(mon, "pause", step, "paused at step %lld", (long long)step);
        st_probe_set_phase(p, ST_PHASE_IDLE);
        for (;;) {
            if (g_term) return 1;
            sleep_s(0.05);
            unsigned b = st_monitor_take_control(mon);
            if (b & ST_CTL_STOP) {
                st_monitor_event(mon, "stop", step, "stop requested while paused");
                return 1;
            }
            if (b & ST_CTL_RESUME) break;
        }
        st_monitor_event(mon, "resume", step, "resumed at step %lld", (long long)step);
    }
    return 0;
}

/* Returns 1 when stopped by a control request or a signal. */
static int run_steps(const opts_t *o, st_telemetry *tel, st_monitor *mon) {
    st_probe *p = st_telemetry_probe(tel);
    double phase_s = o->step_ms * 1e-3 / 5;
    if (o->rank == o->slow_rank) phase_s *= o->slow_factor;
    for (int64_t step = 0; step < o->steps && !g_term; step++) {
        double t0 = now_s();
        st_probe_set_step(p, step);
        for (int ph = ST_PHASE_DATA; ph <= ST_PHASE_OPTIMIZER; ph++) {
            st_probe_set_phase(p, (st_phase)ph);
            sleep_s(phase_s);
            if (o->rank == o->hang_rank && step == o->hang_step && ph == o->hang_phase) sleep_s(o->hang_s);
        }
        st_probe_set_phase(p, ST_PHASE_IDLE);
        st_step_report r;
        fill_report(o, step, now_s() - t0, &r);
        st_telemetry_report(tel, &r);
        if (mon && rank0_control(mon, p, step)) {
            st_probe_set_phase(p, ST_PHASE_IDLE);
            return 1;
        }
    }
    st_probe_set_phase(p, ST_PHASE_IDLE);
    return g_term != 0;
}

static int run_rank(const opts_t *o) {
    st_telemetry_opts to = {.coordinator_addr = o->pull, .rank = o->rank, .heartbeat_ms = o->heartbeat_ms};
    st_telemetry *tel;
    if (st_telemetry_start(&to, &tel) != 0) {
        fprintf(stderr, "telemetry_driver rank %d: %s\n", o->rank, st_error());
        return 1;
    }
    sleep_s(o->start_delay_ms * 1e-3);
    run_steps(o, tel, NULL);
    st_telemetry_stop(tel);
    return 0;
}

static int run_coordinator(const opts_t *o, const char *self) {
    char token[ST_TOKEN_BUF];
    if (st_token_create(o->run_dir, token) != 0) {
        fprintf(stderr, "telemetry_driver: %s\n", st_error());
        return 1;
    }
    st_monitor_opts mo = {.publish_addr = o->publish, .control_addr = o->control, .token = token,
                          .world_size = o->world, .stall_after_s = o->stall_after};
    st_monitor *mon;
    if (st_monitor_start(&mo, &mon) != 0) {
        fprintf(stderr, "telemetry_driver: %s\n", st_error());
        return 1;
    }
    printf("PULL %s\n", st_monitor_pull_endpoint(mon));
    fflush(stdout);
    pid_t pids[256];
    int nchild = 0;
    for (int r = 1; r < o->world && r < 256; r++) {
        char rank[16], world[16], steps[16], stepms[16], hb[16], delay[16], slowr[16], slowf[32], hangr[16],
            hangs[16], hangp[16], hangt[32];
        snprintf(rank, sizeof rank, "%d", r);
        snprintf(world, sizeof world, "%d", o->world);
        snprintf(steps, sizeof steps, "%d", o->steps);
        snprintf(stepms, sizeof stepms, "%d", o->step_ms);
        snprintf(hb, sizeof hb, "%d", o->heartbeat_ms);
        snprintf(delay, sizeof delay, "%d", o->start_delay_ms);
        snprintf(slowr, sizeof slowr, "%d", o->slow_rank);
        snprintf(slowf, sizeof slowf, "%g", o->slow_factor);
        snprintf(hangr, sizeof hangr, "%d", o->hang_rank);
        snprintf(hangs, sizeof hangs, "%d", o->hang_step);
        snprintf(hangp, sizeof hangp, "%s", st_phase_name(o->hang_phase));
        snprintf(hangt, sizeof hangt, "%g", o->hang_s);
        pid_t pid = fork();
        if (pid == 0) {
            execl(self, self, "--rank", rank, "--pull", st_monitor_pull_endpoint(mon), "--world", world,
                  "--steps", steps, "--step-ms", stepms, "--heartbeat-ms", hb, "--start-delay-ms", delay,
                  "--slow-rank", slowr, "--slow-factor", slowf, "--hang-rank", hangr, "--hang-step", hangs,
                  "--hang-phase", hangp, "--hang-s", hangt, (char *)NULL);
            _exit(127);
        }
        pids[nchild++] = pid;
        printf("RANK %d PID %d\n", r, (int)pid);
    }
    printf("RANK 0 PID %d\n", (int)getpid());
    fflush(stdout);

    st_telemetry_opts to = {.coordinator_addr = st_monitor_pull_endpoint(mon), .rank = 0,
                            .heartbeat_ms = o->heartbeat_ms};
    st_telemetry *tel;
    if (st_telemetry_start(&to, &tel) != 0) {
        fprintf(stderr, "telemetry_driver: %s\n", st_error());
        return 1;
    }
    sleep_s(o->start_delay_ms * 1e-3);
    st_monitor_event(mon, "start", 0, "driver with %d ranks, %d steps", o->world, o->steps);
    int stopped = run_steps(o, tel, mon);
    st_telemetry_stop(tel);
    /* A stop ends the other ranks (the real loop broadcasts it); otherwise they finish their steps. */
    for (int i = 0; i < nchild; i++) {
        if (stopped) kill(pids[i], SIGTERM);
        int status;
        while (waitpid(pids[i], &status, 0) < 0 && errno == EINTR) {}
    }
    sleep_s(0.2); /* the last reports are in flight on loopback */
    st_monitor_event(mon, "end", o->steps, "driver finished");
    st_monitor_stats s;
    st_monitor_get_stats(mon, &s);
    st_monitor_stop(mon);
    printf("STATS heartbeats=%llu reports=%llu summaries=%llu alerts=%llu bad=%llu control_ok=%llu control_refused=%llu\n",
           (unsigned long long)s.heartbeats, (unsigned long long)s.reports, (unsigned long long)s.summaries,
           (unsigned long long)s.alerts, (unsigned long long)s.bad_messages, (unsigned long long)s.control_ok,
           (unsigned long long)s.control_refused);
    return 0;
}

int main(int argc, char **argv) {
    opts_t o = {.world = 2, .steps = 10, .step_ms = 50, .heartbeat_ms = 200, .stall_after = 30,
                .slow_factor = 1, .slow_rank = -1, .hang_rank = -1, .hang_step = -1,
                .hang_phase = ST_PHASE_COMM, .rank = 0, .run_dir = ".", .publish = "tcp://127.0.0.1:5555",
                .control = "tcp://127.0.0.1:5556"};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--world")) o.world = atoi(v);
        else if (!strcmp(k, "--steps")) o.steps = atoi(v);
        else if (!strcmp(k, "--step-ms")) o.step_ms = atoi(v);
        else if (!strcmp(k, "--heartbeat-ms")) o.heartbeat_ms = atoi(v);
        else if (!strcmp(k, "--start-delay-ms")) o.start_delay_ms = atoi(v);
        else if (!strcmp(k, "--stall-after")) o.stall_after = atof(v);
        else if (!strcmp(k, "--slow-rank")) o.slow_rank = atoi(v);
        else if (!strcmp(k, "--slow-factor")) o.slow_factor = atof(v);
        else if (!strcmp(k, "--hang-rank")) o.hang_rank = atoi(v);
        else if (!strcmp(k, "--hang-step")) o.hang_step = atoi(v);
        else if (!strcmp(k, "--hang-phase")) o.hang_phase = st_phase_from_name(v);
        else if (!strcmp(k, "--hang-s")) o.hang_s = atof(v);
        else if (!strcmp(k, "--rank")) o.rank = atoi(v);
        else if (!strcmp(k, "--pull")) o.pull = v;
        else if (!strcmp(k, "--run-dir")) o.run_dir = v;
        else if (!strcmp(k, "--publish")) o.publish = v;
        else if (!strcmp(k, "--control")) o.control = v;
        else {
            fprintf(stderr, "telemetry_driver: unknown option %s\n", k);
            return 2;
        }
    }
    if (o.world < 1 || o.world > 256 || o.hang_phase < 0) {
        fprintf(stderr, "telemetry_driver: --world must be 1..256 and --hang-phase a phase name\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (o.pull) return run_rank(&o);
    return run_coordinator(&o, "/proc/self/exe");
}
