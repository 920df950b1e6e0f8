/* cmd_monitor.c — `shardtune monitor ADDR [--plain|--json] [--count N] [--timeout S]
 *                                   [--run-dir DIR | --server-key FILE]`
 * Subscribes to a job's PUB socket (monitor.publish) and shows it: a live table (one row per rank and a
 * summary line) redrawn with ANSI escapes when stdout is a terminal, otherwise (or with --plain) one
 * line per message, or with --json one JSON object per line.
 * It keeps running across the end of a job: ZeroMQ reconnects the SUB socket when the next job binds
 * the same address. It exits on SIGINT/SIGTERM, or after N messages / S seconds when asked.
 * With --server-key, or --run-dir when DIR/monitor.pub exists (a job with monitor.curve: true), it is a
 * CURVE client of that key; a plain SUB never completes the handshake with a CURVE job and sees nothing. */
#include "common/util.h"
#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "coordinator/monitor/control_token.h"
#include "coordinator/monitor/telemetry.h"
#include "shardtune.pb-c.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

enum { OUT_TABLE, OUT_PLAIN, OUT_JSON };
#define MON_MAX_RANKS 4096

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

typedef struct {
    int seen;
    Shardtune__Heartbeat hb; /* shallow copy; host kept in our own buffer */
    char host[64];
    double received;
} rank_row;

typedef struct {
    int mode;
    rank_row *rows;
    int nrows;
    int have_summary;
    int64_t step;
    double loss, lr, tokens_per_s, grad_norm;
    uint64_t alerts;
    char last_alert[256], last_event[256];
    double last_draw;
    /* hashes of the step summaries and events already shown: the job replays its recent history to every
     * subscriber whenever one joins (monitor_server.c), so a message may arrive twice */
    uint64_t seen[1024];
    int n_seen, seen_next;
} monitor_view;

/* 1 when this step/event message (topic + body) was shown before; else remembers it and returns 0. */
static int already_seen(monitor_view *v, const void *topic, size_t tn, const void *body, size_t bn) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a over topic, a separator, body */
    for (size_t i = 0; i < tn; i++) h = (h ^ ((const unsigned char *)topic)[i]) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
    for (size_t i = 0; i < bn; i++) h = (h ^ ((const unsigned char *)body)[i]) * 1099511628211ull;
    for (int i = 0; i < v->n_seen; i++)
        if (v->seen[i] == h) return 1;
    int cap = (int)(sizeof v->seen / sizeof v->seen[0]);
    v->seen[v->seen_next] = h;
    v->seen_next = (v->seen_next + 1) % cap;
    if (v->n_seen < cap) v->n_seen++;
    return 0;
}

/* Prints s as a JSON string literal. */
static void json_str(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p == '\n') fputs("\\n", stdout);
        else if (*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void human_bytes(uint64_t b, char *out, size_t n) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int i = 0;
    while (v >= 1024 && i < 4) v /= 1024, i++;
    snprintf(out, n, "%.1f %s", v, u[i]);
}

static void draw_table(monitor_view *v) {
    fputs("\033[H\033[2J", stdout);
    if (v->have_summary)
        printf("step %lld  loss %.4f  lr %.3g  grad_norm %.3g  tokens/s %.1f  alerts %llu\n", (long long)v->step,
               v->loss, v->lr, v->grad_norm, v->tokens_per_s, (unsigned long long)v->alerts);
    else
        printf("waiting for the first step summary...  alerts %llu\n", (unsigned long long)v->alerts);
    printf("%-6s %-20s %10s %-11s %10s %12s %8s\n", "rank", "host", "step", "phase", "in phase", "rss", "seen");
    double now = st_now();
    for (int r = 0; r < v->nrows; r++) {
        rank_row *row = &v->rows[r];
        if (!row->seen) continue;
        char rss[32];
        human_bytes(row->hb.rss_bytes, rss, sizeof rss);
        printf("%-6d %-20.20s %10lld %-11s %9.1fs %12s %7.1fs\n", r, row->host, (long long)row->hb.step,
               st_phase_name(row->hb.phase), row->hb.phase_seconds, rss, now - row->received);
    }
    if (v->last_alert[0]) printf("last alert: %s\n", v->last_alert);
    if (v->last_event[0]) printf("last event: %s\n", v->last_event);
    fflush(stdout);
    v->last_draw = now;
}

static void on_step(monitor_view *v, const Shardtune__StepSummary *s) {
    v->have_summary = 1;
    v->step = s->step;
    v->loss = s->loss;
    v->lr = s->lr;
    v->grad_norm = s->grad_norm;
    v->tokens_per_s = s->tokens_per_s;
    if (v->mode == OUT_PLAIN) {
        printf("step %lld loss %.6f lr %.6g grad_norm %.6g tokens/s %.1f tokens %llu step_s %.3f", (long long)s->step,
               s->loss, s->lr, s->grad_norm, s->tokens_per_s, (unsigned long long)s->tokens, s->step_seconds);
        for (size_t i = 0; i < s->n_task_loss; i++) printf(" loss[%s] %.6f", s->task_loss[i]->key, s->task_loss[i]->value);
        putchar('\n');
    } else if (v->mode == OUT_JSON) {
        printf("{\"topic\":\"step\",\"step\":%lld,\"loss\":%.17g,\"grad_norm\":%.17g,\"lr\":%.17g,"
               "\"tokens_per_s\":%.17g,\"mfu\":%.17g,\"stage\":%d,\"world_size\":%d,\"tokens\":%llu,"
               "\"step_seconds\":%.17g,\"task_loss\":{",
               (long long)s->step, s->loss, s->grad_norm, s->lr, s->tokens_per_s, s->mfu, s->stage, s->world_size,
               (unsigned long long)s->tokens, s->step_seconds);
        for (size_t i = 0; i < s->n_task_loss; i++) {
            if (i) putchar(',');
            json_str(s->task_loss[i]->key);
            printf(":%.17g", s->task_loss[i]->value);
        }
        printf("}}\n");
    }
}

static void on_rank(monitor_view *v, const Shardtune__Heartbeat *hb) {
    if (hb->rank >= 0 && hb->rank < MON_MAX_RANKS) {
        if (hb->rank >= v->nrows) {
            int n = hb->rank + 1;
            rank_row *rows = realloc(v->rows, (size_t)n * sizeof *rows);
            if (rows) {
                memset(rows + v->nrows, 0, (size_t)(n - v->nrows) * sizeof *rows);
                v->rows = rows;
                v->nrows = n;
            }
        }
        if (hb->rank < v->nrows) {
            rank_row *row = &v->rows[hb->rank];
            row->seen = 1;
            row->hb = *hb;
            snprintf(row->host, sizeof row->host, "%s", hb->host ? hb->host : "");
            row->hb.host = row->host;
            row->hb.job_id = NULL;
            row->received = st_now();
        }
    }
    if (v->mode == OUT_PLAIN) {
        printf("rank %d host %s step %lld phase %s %.1f s rss %llu\n", hb->rank, hb->host, (long long)hb->step,
               st_phase_name(hb->phase), hb->phase_seconds, (unsigned long long)hb->rss_bytes);
    } else if (v->mode == OUT_JSON) {
        printf("{\"topic\":\"rank\",\"rank\":%d,\"host\":", hb->rank);
        json_str(hb->host);
        printf(",\"step\":%lld,\"phase\":\"%s\",\"phase_seconds\":%.6g,\"rss_bytes\":%llu,\"pid\":%d}\n",
               (long long)hb->step, st_phase_name(hb->phase), hb->phase_seconds,
               (unsigned long long)hb->rss_bytes, hb->pid);
    }
}

static void on_event(monitor_view *v, const Shardtune__Event *e) {
    snprintf(v->last_event, sizeof v->last_event, "%s at step %lld: %s", e->kind, (long long)e->step, e->text);
    if (v->mode == OUT_PLAIN) {
        printf("event %s step %lld rank %d: %s\n", e->kind, (long long)e->step, e->rank, e->text);
    } else if (v->mode == OUT_JSON) {
        printf("{\"topic\":\"event\",\"kind\":");
        json_str(e->kind);
        printf(",\"step\":%lld,\"rank\":%d,\"text\":", (long long)e->step, e->rank);
        json_str(e->text);
        printf("}\n");
    }
}

static void on_alert(monitor_view *v, const Shardtune__Alert *a) {
    v->alerts++;
    snprintf(v->last_alert, sizeof v->last_alert, "%s", a->text);
    if (v->mode == OUT_PLAIN) {
        printf("alert %s rank %d: %s\n", a->kind, a->rank, a->text);
    } else if (v->mode == OUT_JSON) {
        printf("{\"topic\":\"alert\",\"kind\":");
        json_str(a->kind);
        printf(",\"rank\":%d,\"host\":", a->rank);
        json_str(a->host);
        printf(",\"step\":%lld,\"phase\":\"%s\",\"seconds\":%.6g,\"text\":", (long long)a->step,
               st_phase_name(a->phase), a->seconds);
        json_str(a->text);
        printf("}\n");
    }
}

/* Decodes one [topic, message]; returns 1 if it was a known, well-formed message. */
static int handle(monitor_view *v, const char *topic, size_t tlen, const uint8_t *data, size_t len) {
#define TOPIC_IS(s) (tlen == strlen(s) && !memcmp(topic, s, tlen))
    int ok = 0;
    if (TOPIC_IS("step")) {
        Shardtune__StepSummary *m = shardtune__step_summary__unpack(NULL, len, data);
        if ((ok = m != NULL)) on_step(v, m), shardtune__step_summary__free_unpacked(m, NULL);
    } else if (TOPIC_IS("rank")) {
        Shardtune__Heartbeat *m = shardtune__heartbeat__unpack(NULL, len, data);
        if ((ok = m != NULL)) on_rank(v, m), shardtune__heartbeat__free_unpacked(m, NULL);
    } else if (TOPIC_IS("event")) {
        Shardtune__Event *m = shardtune__event__unpack(NULL, len, data);
        if ((ok = m != NULL)) on_event(v, m), shardtune__event__free_unpacked(m, NULL);
    } else if (TOPIC_IS("alert")) {
        Shardtune__Alert *m = shardtune__alert__unpack(NULL, len, data);
        if ((ok = m != NULL)) on_alert(v, m), shardtune__alert__free_unpacked(m, NULL);
    }
#undef TOPIC_IS
    if (ok && v->mode != OUT_TABLE) fflush(stdout);
    return ok;
}

/* Reads one multipart message; returns 1 if handled. Malformed input is skipped, never fatal. */
static int receive_one(monitor_view *v, void *sub) {
    zmq_msg_t parts[2];
    int n = 0, more = 1, extra = 0;
    while (more) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sub, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            break;
        }
        more = zmq_msg_more(&msg);
        if (n < 2) parts[n++] = msg;
        else zmq_msg_close(&msg), extra = 1;
    }
    int ok = 0;
    int replayable = n == 2 && ((zmq_msg_size(&parts[0]) == 4 && !memcmp(zmq_msg_data(&parts[0]), "step", 4)) ||
                                (zmq_msg_size(&parts[0]) == 5 && !memcmp(zmq_msg_data(&parts[0]), "event", 5)));
    if (replayable && already_seen(v, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]), zmq_msg_data(&parts[1]),
                                   zmq_msg_size(&parts[1])))
        extra = 1; /* a replay of something shown: skip it */
    if (n == 2 && !extra)
        ok = handle(v, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]), zmq_msg_data(&parts[1]),
                    zmq_msg_size(&parts[1]));
    for (int i = 0; i < n; i++) zmq_msg_close(&parts[i]);
    return ok;
}

int st_cmd_monitor(int argc, char **argv) {
    /* ADDR is optional: without it, the address the job wrote to RUN_DIR/monitor.addr; flags may come
     * before or after it */
    if (argc < 2) {
        fprintf(stderr, "usage: shardtune monitor [ADDR] [--run-dir DIR] [--plain|--json] [--count N] [--timeout S] "
                        "[--server-key FILE]\n");
        return ST_EXIT_USAGE;
    }
    const char *addr = NULL;
    char addr_buf[1024];
    monitor_view v;
    memset(&v, 0, sizeof v);
    v.mode = isatty(STDOUT_FILENO) ? OUT_TABLE : OUT_PLAIN;
    long count = 0;
    double timeout_s = 0;
    const char *run_dir = NULL, *server_key_file = NULL;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-' && !addr) addr = argv[i];
        else if (!strcmp(argv[i], "--plain")) v.mode = OUT_PLAIN;
        else if (!strcmp(argv[i], "--json")) v.mode = OUT_JSON;
        else if (!strcmp(argv[i], "--count") && i + 1 < argc) {
            int64_t n;
            int rc = st_cli_int("monitor", "--count", argv[++i], 0, INT64_MAX, &n);
            if (rc) return rc;
            count = (long)n;
        }
        else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
            int rc = st_cli_real("monitor", "--timeout", argv[++i], 0, 1e9, &timeout_s);
            if (rc) return rc;
        }
        else if (!strcmp(argv[i], "--run-dir") && i + 1 < argc) run_dir = argv[++i];
        else if (!strcmp(argv[i], "--server-key") && i + 1 < argc) server_key_file = argv[++i];
        else {
            fprintf(stderr, "shardtune monitor: error: unknown argument '%s'\n", argv[i]);
            return ST_EXIT_USAGE;
        }
    }
    if (!addr && !run_dir) return st_cli_missing("monitor", "ADDR: pass the job's monitor.publish address or --run-dir DIR");
    if (!addr) {
        if (st_monitor_addr_read(run_dir, "publish", addr_buf, sizeof addr_buf)) return st_cli_error("monitor", st_error());
        addr = addr_buf;
    }
    char server_key[ST_CURVE_KEY_BUF];
    int curve = st_curve_client_key(server_key_file, run_dir, server_key, NULL, 0);
    if (curve < 0) return st_cli_error("monitor", st_error());
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: zmq_poll returns EINTR and we leave */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    void *ctx = zmq_ctx_new();
    void *sub = ctx ? zmq_socket(ctx, ZMQ_SUB) : NULL;
    if (!sub) return st_cli_error("monitor", "cannot create a ZeroMQ SUB socket");
    int linger = 0, ivl = 100, ivl_max = 1000, hb_ivl = 1000, hb_timeout = 5000; /* a new job is found within 1 s */
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sub, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(sub, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max);
    zmq_setsockopt(sub, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof hb_ivl);
    zmq_setsockopt(sub, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    if (curve && st_curve_client_setup(sub, server_key) != 0) {
        zmq_close(sub);
        zmq_ctx_term(ctx);
        return st_cli_error("monitor", st_error());
    }
    if (zmq_connect(sub, addr) != 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "bad monitor address '%.200s': %s", addr, zmq_strerror(zmq_errno()));
        zmq_close(sub);
        zmq_ctx_term(ctx);
        return st_cli_error("monitor", msg);
    }
    if (v.mode == OUT_TABLE) draw_table(&v);
    double start = st_now();
    long received = 0;
    while (!g_stop) {
        if (timeout_s > 0 && st_now() - start >= timeout_s) break;
        zmq_pollitem_t item = {.socket = sub, .events = ZMQ_POLLIN};
        int rc = zmq_poll(&item, 1, 200);
        if (rc < 0) {
            if (zmq_errno() == EINTR) continue;
            break;
        }
        if (item.revents & ZMQ_POLLIN) received += receive_one(&v, sub);
        if (v.mode == OUT_TABLE && st_now() - v.last_draw > 0.25) draw_table(&v);
        if (count > 0 && received >= count) break;
    }
    if (v.mode == OUT_TABLE) draw_table(&v);
    free(v.rows);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return ST_EXIT_OK;
}
