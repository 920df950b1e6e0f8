/* monitor_server.c — coordinator telemetry thread (see monitor_server.h).
 *
 * All sockets live in the thread; the rest of the process talks to it through an event mailbox
 * (mailbox.h: bounded queue + wake-up, shared with the telemetry thread) and one atomic control word. Step aggregation keeps a ring of the most recent
 * ST_MON_SLOTS steps, so ranks may run a few steps apart (or one may be stopped for a while) and every
 * step still gets its summary once the last rank catches up. */
#include "coordinator/monitor/monitor_server.h"

#include "common/error.h"
#include "common/util.h"
#include "coordinator/monitor/control_token.h"
#include "coordinator/monitor/mailbox.h"
#include "coordinator/monitor/telemetry.h"
#include "shardtune.pb-c.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define ST_MON_SLOTS 256
#define ST_MON_EVENTS 256
#define ST_MON_REPLAY 256 /* step summaries and events kept for late subscribers */
#define ST_MON_MAX_TASKS ST_TELEMETRY_MAX_TASKS

typedef struct {
    char kind[32];
    int64_t step;
    int rank;
    char text[1024]; /* sample answers (eval.generate) use the room */
} st_event_item;

/* Partial aggregate of one step. */
typedef struct {
    int64_t step; /* -1: empty */
    int count;
    unsigned char *have;  /* [world] */
    double *step_seconds; /* [world] */
    double loss_x_tokens, loss_sum;
    uint64_t tokens;
    int ntasks;
    char task_name[ST_MON_MAX_TASKS][ST_TELEMETRY_TASK_NAME];
    double task_loss_x_tokens[ST_MON_MAX_TASKS], task_loss_sum[ST_MON_MAX_TASKS];
    uint64_t task_tokens[ST_MON_MAX_TASKS];
    int task_count[ST_MON_MAX_TASKS];
    double grad_norm, lr, mfu;
    int stage;
} st_step_slot;

struct st_monitor {
    int world;
    double stall_after_s;
    char token[64];
    char pull_endpoint[256];
    char pub_endpoint[256], rep_endpoint[256]; /* as bound, read before the thread starts (st_monitor_bound) */
    void *ctx, *pull, *pub, *rep;
    pthread_t thread;
    atomic_bool stopping;
    atomic_uint control;
    st_mailbox events;      /* events queued by the API (st_monitor_event), bounded: a full one drops */
    pthread_mutex_t lock;   /* guards stats and ranks against the API's readers */
    st_monitor_stats stats;
    /* thread-only state */
    st_rank_state *ranks;
    int *strag_consecutive, *strag_raised, *strag_flag;
    st_step_slot *slots;
    int64_t last_summary_step;
    char last_alert[256];
    /* recent "step" and "event" messages, re-sent when a subscriber joins (late-joiner replay) */
    struct replay_item { char topic[8]; unsigned char *buf; size_t len; } replay[ST_MON_REPLAY];
    int replay_head, replay_count;
};

static void bump(st_monitor *m, uint64_t *counter) {
    pthread_mutex_lock(&m->lock);
    (*counter)++;
    pthread_mutex_unlock(&m->lock);
}

/* ---- publishing ---- */

/* Keeps a copy of a step/event message for subscribers that join later (bounded ring). */
static void remember(st_monitor *m, const char *topic, const unsigned char *buf, size_t n) {
    if (strcmp(topic, "step") != 0 && strcmp(topic, "event") != 0) return;
    unsigned char *copy = malloc(n ? n : 1);
    if (!copy) return;
    memcpy(copy, buf, n);
    int slot = (m->replay_head + m->replay_count) % ST_MON_REPLAY;
    if (m->replay_count == ST_MON_REPLAY) {
        slot = m->replay_head;
        free(m->replay[slot].buf);
        m->replay_head = (m->replay_head + 1) % ST_MON_REPLAY;
    } else {
        m->replay_count++;
    }
    snprintf(m->replay[slot].topic, sizeof m->replay[slot].topic, "%s", topic);
    m->replay[slot].buf = copy;
    m->replay[slot].len = n;
}

/* A subscription arrived on the XPUB socket: replay the recent history. The replay reaches every
 * subscriber (PUB has no per-peer send), so consumers treat step summaries as keyed by step. */
static void handle_subscription(st_monitor *m) {
    unsigned char frame[256];
    int n = zmq_recv(m->pub, frame, sizeof frame, ZMQ_DONTWAIT);
    if (n < 1 || frame[0] != 1) return; /* an unsubscribe, or nothing */
    for (int i = 0; i < m->replay_count; i++) {
        const struct replay_item *r = &m->replay[(m->replay_head + i) % ST_MON_REPLAY];
        if (zmq_send(m->pub, r->topic, strlen(r->topic), ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
            zmq_send(m->pub, r->buf, r->len, ZMQ_DONTWAIT);
    }
}

static void publish(st_monitor *m, const char *topic, const ProtobufCMessage *msg) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    unsigned char stackbuf[4096];
    unsigned char *buf = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!buf) return;
    protobuf_c_message_pack(msg, buf);
    /* PUB never blocks: slow subscribers lose messages at their high-water mark. */
    if (m->pub && zmq_send(m->pub, topic, strlen(topic), ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        zmq_send(m->pub, buf, n, ZMQ_DONTWAIT);
    remember(m, topic, buf, n);
    if (buf != stackbuf) free(buf);
}

static void publish_event(st_monitor *m, const char *kind, int64_t step, int rank, const char *text) {
    Shardtune__Event ev = SHARDTUNE__EVENT__INIT;
    ev.version = 1;
    ev.kind = (char *)kind;
    ev.step = step;
    ev.rank = rank;
    ev.text = (char *)text;
    publish(m, "event", &ev.base);
    bump(m, &m->stats.events);
}

static void publish_alert(st_monitor *m, const char *kind, const st_rank_state *r, double seconds,
                          const char *text) {
    Shardtune__Alert a = SHARDTUNE__ALERT__INIT;
    a.version = 1;
    a.kind = (char *)kind;
    a.rank = r->rank;
    a.host = (char *)r->host;
    a.step = r->step;
    a.phase = (Shardtune__Phase)r->phase;
    a.seconds = seconds;
    a.text = (char *)text;
    publish(m, "alert", &a.base);
    snprintf(m->last_alert, sizeof m->last_alert, "%s", text);
    bump(m, &m->stats.alerts);
}

void st_monitor_event(st_monitor *m, const char *kind, int64_t step, const char *fmt, ...) {
    st_event_item it;
    memset(&it, 0, sizeof it);
    snprintf(it.kind, sizeof it.kind, "%s", kind);
    it.step = step;
    it.rank = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it.text, sizeof it.text, fmt, ap);
    va_end(ap);
    st_mailbox_put(&m->events, &it);
}

static void drain_events(st_monitor *m) {
    st_event_item it;
    while (st_mailbox_take(&m->events, &it)) publish_event(m, it.kind, it.step, it.rank, it.text);
}

unsigned st_monitor_take_control(st_monitor *m) { return atomic_exchange(&m->control, 0u); }

void st_monitor_get_stats(st_monitor *m, st_monitor_stats *out) {
    pthread_mutex_lock(&m->lock);
    *out = m->stats;
    pthread_mutex_unlock(&m->lock);
}

int st_monitor_missing_ranks(st_monitor *m, int self, int64_t step, int phase, double silent_s, char *out, size_t size) {
    int n = 0;
    size_t used = 0;
    out[0] = 0;
    double now = st_now();
    pthread_mutex_lock(&m->lock);
    for (int r = 0; r < m->world; r++) {
        const st_rank_state *s = &m->ranks[r];
        if (r == self || (s->heard && s->step == step && s->phase == phase && now - s->heard_at < silent_s)) continue;
        n++;
        if (used + 16 >= size) continue;
        if (s->heard)
            used += (size_t)snprintf(out + used, size - used, "%s%d (host %s, last seen at step %lld in %s, %.1f s ago)",
                                     used ? ", " : "", r, s->host, (long long)s->step, st_phase_name(s->phase),
                                     now - s->heard_at);
        else
            used += (size_t)snprintf(out + used, size - used, "%s%d (never heard from)", used ? ", " : "", r);
    }
    pthread_mutex_unlock(&m->lock);
    return n;
}

/* Copies of what resolve_endpoint read before the thread started: the sockets belong to the monitor thread
 * (a ZeroMQ socket must not be used by two threads at once), so no other thread calls into them. */
void st_monitor_bound(const st_monitor *m, char *publish, char *control, size_t size) {
    snprintf(publish, size, "%s", m->pub_endpoint);
    snprintf(control, size, "%s", m->rep_endpoint);
}

const char *st_monitor_pull_endpoint(const st_monitor *m) { return m->pull_endpoint; }

/* ---- aggregation ---- */

static void slot_reset(st_monitor *m, st_step_slot *s, int64_t step) {
    s->step = step;
    s->count = 0;
    memset(s->have, 0, (size_t)m->world);
    memset(s->step_seconds, 0, (size_t)m->world * sizeof *s->step_seconds);
    s->loss_x_tokens = s->loss_sum = 0;
    s->tokens = 0;
    s->ntasks = 0;
    s->grad_norm = s->lr = s->mfu = 0;
    s->stage = 0;
}

static int task_index(st_step_slot *s, const char *name) {
    for (int i = 0; i < s->ntasks; i++)
        if (!strncmp(s->task_name[i], name, ST_TELEMETRY_TASK_NAME - 1)) return i;
    if (s->ntasks == ST_MON_MAX_TASKS) return -1;
    int i = s->ntasks++;
    snprintf(s->task_name[i], ST_TELEMETRY_TASK_NAME, "%s", name);
    s->task_loss_x_tokens[i] = s->task_loss_sum[i] = 0;
    s->task_tokens[i] = 0;
    s->task_count[i] = 0;
    return i;
}

/* Token-weighted mean when tokens are known, plain mean otherwise. */
static double weighted(double x_tokens, uint64_t tokens, double sum, int count) {
    if (tokens > 0) return x_tokens / (double)tokens;
    return count > 0 ? sum / count : 0;
}

static void publish_summary(st_monitor *m, st_step_slot *s) {
    Shardtune__StepSummary sum = SHARDTUNE__STEP_SUMMARY__INIT;
    sum.version = 1;
    sum.step = s->step;
    sum.loss = weighted(s->loss_x_tokens, s->tokens, s->loss_sum, s->count);
    sum.grad_norm = s->grad_norm;
    sum.lr = s->lr;
    sum.mfu = s->mfu;
    sum.stage = s->stage;
    sum.world_size = m->world;
    sum.tokens = s->tokens;
    double slowest = 0;
    for (int r = 0; r < m->world; r++)
        if (s->step_seconds[r] > slowest) slowest = s->step_seconds[r];
    sum.step_seconds = slowest;
    sum.tokens_per_s = slowest > 0 ? (double)s->tokens / slowest : 0;
    Shardtune__StepSummary__TaskLossEntry e[ST_MON_MAX_TASKS], *ep[ST_MON_MAX_TASKS];
    for (int i = 0; i < s->ntasks; i++) {
        shardtune__step_summary__task_loss_entry__init(&e[i]);
        e[i].key = s->task_name[i];
        e[i].value = weighted(s->task_loss_x_tokens[i], s->task_tokens[i], s->task_loss_sum[i], s->task_count[i]);
        ep[i] = &e[i];
    }
    sum.n_task_loss = (size_t)s->ntasks;
    sum.task_loss = ep;
    publish(m, "step", &sum.base);
    bump(m, &m->stats.summaries);
    if (s->step > m->last_summary_step) m->last_summary_step = s->step;

    st_straggler_update(s->step_seconds, m->world, m->strag_consecutive, m->strag_raised, m->strag_flag);
    double med = st_median(s->step_seconds, m->world);
    for (int r = 0; r < m->world; r++) {
        char text[256];
        if (m->strag_flag[r] == 1) {
            snprintf(text, sizeof text, "rank %d on host %s is a straggler: %.3f s per step vs median %.3f s for %d steps",
                     r, m->ranks[r].host[0] ? m->ranks[r].host : "?", s->step_seconds[r], med, ST_STRAGGLER_STEPS);
            publish_alert(m, "straggler", &m->ranks[r], s->step_seconds[r], text);
        } else if (m->strag_flag[r] == -1) {
            snprintf(text, sizeof text, "rank %d is no longer a straggler", r);
            publish_event(m, "recovered", s->step, r, text);
        }
    }
    s->step = -1;
}

static void on_report(st_monitor *m, const Shardtune__StepReport *rep) {
    int r = rep->rank;
    if (r < 0 || r >= m->world || rep->step < 0) {
        bump(m, &m->stats.bad_messages);
        return;
    }
    bump(m, &m->stats.reports);
    st_step_slot *s = &m->slots[rep->step % ST_MON_SLOTS];
    if (s->step != rep->step) {
        if (s->step > rep->step) return; /* older than anything we still track */
        if (s->step >= 0) bump(m, &m->stats.dropped_steps);
        slot_reset(m, s, rep->step);
    }
    if (s->have[r]) return; /* duplicate */
    s->have[r] = 1;
    s->count++;
    s->step_seconds[r] = rep->step_seconds;
    s->loss_x_tokens += rep->loss * (double)rep->tokens;
    s->loss_sum += rep->loss;
    s->tokens += rep->tokens;
    for (size_t i = 0; i < rep->n_task_loss; i++) {
        const char *name = rep->task_loss[i]->key ? rep->task_loss[i]->key : "";
        int k = task_index(s, name);
        if (k < 0) continue;
        uint64_t tt = 0;
        for (size_t j = 0; j < rep->n_task_tokens; j++)
            if (rep->task_tokens[j]->key && !strcmp(rep->task_tokens[j]->key, name)) tt = rep->task_tokens[j]->value;
        s->task_loss_x_tokens[k] += rep->task_loss[i]->value * (double)tt;
        s->task_loss_sum[k] += rep->task_loss[i]->value;
        s->task_tokens[k] += tt;
        s->task_count[k]++;
    }
    if (r == 0) {
        s->grad_norm = rep->grad_norm;
        s->lr = rep->lr;
        s->mfu = rep->mfu;
        s->stage = rep->stage;
    }
    if (s->count == m->world) publish_summary(m, s);
}

static void on_heartbeat(st_monitor *m, const Shardtune__Heartbeat *hb, const void *raw, size_t len) {
    int r = hb->rank;
    if (r < 0 || r >= m->world) {
        bump(m, &m->stats.bad_messages);
        return;
    }
    bump(m, &m->stats.heartbeats);
    pthread_mutex_lock(&m->lock); /* st_monitor_missing_ranks reads the rank table from another thread */
    st_rank_heard(&m->ranks[r], hb->host, hb->step, (int)hb->phase, hb->phase_seconds, st_now());
    pthread_mutex_unlock(&m->lock);
    /* Republish the rank's own bytes: subscribers see exactly what the rank sent. */
    if (m->pub && zmq_send(m->pub, "rank", 4, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0) zmq_send(m->pub, raw, len, ZMQ_DONTWAIT);
}

/* Reads one [kind, message] from PULL; anything else is counted and dropped. */
static void handle_pull(st_monitor *m) {
    zmq_msg_t parts[2];
    int n = 0, more = 1, bad = 0;
    while (more) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, m->pull, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            break;
        }
        more = zmq_msg_more(&msg);
        if (n < 2) parts[n++] = msg;
        else { zmq_msg_close(&msg); bad = 1; }
    }
    if (n != 2 || bad) {
        bump(m, &m->stats.bad_messages);
    } else {
        const char *kind = zmq_msg_data(&parts[0]);
        size_t klen = zmq_msg_size(&parts[0]);
        const uint8_t *data = zmq_msg_data(&parts[1]);
        size_t len = zmq_msg_size(&parts[1]);
        if (klen == strlen(ST_KIND_HEARTBEAT) && !memcmp(kind, ST_KIND_HEARTBEAT, klen)) {
            Shardtune__Heartbeat *hb = shardtune__heartbeat__unpack(NULL, len, data);
            if (hb) on_heartbeat(m, hb, data, len), shardtune__heartbeat__free_unpacked(hb, NULL);
            else bump(m, &m->stats.bad_messages);
        } else if (klen == strlen(ST_KIND_REPORT) && !memcmp(kind, ST_KIND_REPORT, klen)) {
            Shardtune__StepReport *rep = shardtune__step_report__unpack(NULL, len, data);
            if (rep) on_report(m, rep), shardtune__step_report__free_unpacked(rep, NULL);
            else bump(m, &m->stats.bad_messages);
        } else {
            bump(m, &m->stats.bad_messages);
        }
    }
    for (int i = 0; i < n; i++) zmq_msg_close(&parts[i]);
}

/* ---- control ---- */

static void status_text(st_monitor *m, char *out, size_t outsz) {
    size_t off = 0;
    unsigned pending = atomic_load(&m->control);
    off += (size_t)snprintf(out + off, outsz - off, "last step %lld, world %d, pending control 0x%x",
                            (long long)m->last_summary_step, m->world, pending);
    double now = st_now();
    for (int r = 0; r < m->world && off < outsz; r++) {
        const st_rank_state *s = &m->ranks[r];
        if (!s->heard)
            off += (size_t)snprintf(out + off, outsz - off, "; rank %d: no heartbeat yet", r);
        else
            off += (size_t)snprintf(out + off, outsz - off, "; rank %d %s: step %lld %s %.1f s, heard %.1f s ago", r,
                                    s->host, (long long)s->step, st_phase_name(s->phase),
                                    s->phase_seconds, now - s->heard_at);
    }
    if (off < outsz && m->last_alert[0])
        snprintf(out + off, outsz - off, "; last alert: %s", m->last_alert);
}

static void handle_control(st_monitor *m) {
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, m->rep, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&msg);
        return;
    }
    int multipart = zmq_msg_more(&msg);
    while (zmq_msg_more(&msg)) { /* drain extra frames: a request is exactly one frame */
        zmq_msg_close(&msg);
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, m->rep, 0) < 0) break;
    }
    char why[256], text[2048];
    int command = -1;
    unsigned bits = 0;
    int ok = 0;
    if (multipart) snprintf(why, sizeof why, "malformed request (more than one frame)");
    else ok = st_control_decide(zmq_msg_data(&msg), zmq_msg_size(&msg), m->token, &command, &bits, why, sizeof why);
    zmq_msg_close(&msg);
    if (ok && bits) atomic_fetch_or(&m->control, bits);
    if (ok && command == SHARDTUNE__COMMAND__STATUS) status_text(m, text, sizeof text);
    else snprintf(text, sizeof text, "%s", why);
    bump(m, ok ? &m->stats.control_ok : &m->stats.control_refused);

    Shardtune__ControlReply rep = SHARDTUNE__CONTROL_REPLY__INIT;
    rep.version = 1;
    rep.ok = ok;
    rep.text = text;
    rep.step = m->last_summary_step;
    rep.control_bits = atomic_load(&m->control);
    size_t n = shardtune__control_reply__get_packed_size(&rep);
    unsigned char buf[4096];
    if (n > sizeof buf) n = 0; /* cannot happen with text[2048]; keep the REP state machine alive */
    shardtune__control_reply__pack(&rep, buf);
    zmq_send(m->rep, buf, n, 0);
}

/* ---- stalls ---- */

static void check_stalls(st_monitor *m) {
    double now = st_now();
    for (int r = 0; r < m->world; r++) {
        st_rank_state *s = &m->ranks[r];
        double secs;
        int kind = st_stall_check(s, now, m->stall_after_s, &secs);
        if (kind == s->alert) continue;
        char text[256];
        if (kind != ST_STALL_NONE) {
            st_stall_text(s, kind, secs, text, sizeof text);
            publish_alert(m, kind == ST_STALL_SILENT ? "stalled" : "stuck", s, secs, text);
        } else {
            snprintf(text, sizeof text, "rank %d on host %s recovered: step %lld, %s", r, s->host,
                     (long long)s->step, st_phase_name(s->phase));
            publish_event(m, "recovered", s->step, r, text);
        }
        s->alert = kind;
    }
}

static void *monitor_main(void *arg) {
    st_monitor *m = arg;
    double next_check = st_now();
    while (!atomic_load(&m->stopping)) {
        /* either public socket may be off (monitor.publish / monitor.control ""): poll only what exists */
        zmq_pollitem_t items[4] = {
            {.socket = m->pull, .events = ZMQ_POLLIN},
            {.socket = NULL, .fd = st_mailbox_fd(&m->events), .events = ZMQ_POLLIN},
            {.socket = m->rep, .events = ZMQ_POLLIN},
            {.socket = m->pub, .events = ZMQ_POLLIN},
        };
        int n_items = 2, at_rep = -1, at_pub = -1;
        if (m->rep) at_rep = n_items++;
        if (m->pub) items[n_items] = items[3], at_pub = n_items++;
        int rc = zmq_poll(items, n_items, 100);
        if (rc < 0 && zmq_errno() != EINTR) break;
        if (items[0].revents & ZMQ_POLLIN)
            for (int i = 0; i < 256; i++) { /* bounded burst so control stays responsive */
                int ev = 0;
                size_t sz = sizeof ev;
                zmq_getsockopt(m->pull, ZMQ_EVENTS, &ev, &sz);
                if (!(ev & ZMQ_POLLIN)) break;
                handle_pull(m);
            }
        if (at_rep >= 0 && (items[at_rep].revents & ZMQ_POLLIN)) handle_control(m);
        if (at_pub >= 0 && (items[at_pub].revents & ZMQ_POLLIN)) handle_subscription(m);
        if (items[1].revents & ZMQ_POLLIN) st_mailbox_drain_wake(&m->events);
        drain_events(m);
        if (st_now() >= next_check) {
            check_stalls(m);
            next_check = st_now() + 0.1;
        }
    }
    /* Last reports and events (e.g. "end") still go out. */
    for (int i = 0; i < 10000; i++) {
        int ev = 0;
        size_t sz = sizeof ev;
        zmq_getsockopt(m->pull, ZMQ_EVENTS, &ev, &sz);
        if (!(ev & ZMQ_POLLIN)) break;
        handle_pull(m);
    }
    drain_events(m);
    return NULL;
}

/* ---- lifetime ---- */

static void destroy(st_monitor *m) {
    for (int i = 0; i < m->replay_count; i++) free(m->replay[(m->replay_head + i) % ST_MON_REPLAY].buf);
    if (m->pull) zmq_close(m->pull);
    if (m->pub) zmq_close(m->pub);
    if (m->rep) zmq_close(m->rep);
    if (m->ctx) zmq_ctx_term(m->ctx);
    st_mailbox_free(&m->events);
    if (m->slots)
        for (int i = 0; i < ST_MON_SLOTS; i++) {
            free(m->slots[i].have);
            free(m->slots[i].step_seconds);
        }
    free(m->slots);
    free(m->ranks);
    free(m->strag_consecutive);
    free(m->strag_raised);
    free(m->strag_flag);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

/* curve_secret: NULL for a plain socket, else the socket is a CURVE server with that key (set before
 * bind, so no peer ever completes a plain handshake). */
static void *bound_socket(st_monitor *m, int type, const char *addr, const char *what, const char *curve_secret) {
    void *s = zmq_socket(m->ctx, type);
    int64_t maxmsg = 1 << 20; /* never let a peer make us allocate more than 1 MiB per message */
    if (!s) {
        st_fail(ST_ECOMM, "monitor: cannot create %s socket: %s", what, zmq_strerror(zmq_errno()));
        return NULL;
    }
    if (curve_secret && st_curve_server_setup(s, curve_secret) != 0) {
        zmq_close(s);
        return NULL;
    }
    /* XPUB: pass up every subscription, not only the first of its topic, so each joining subscriber gets
     * the replay (handle_subscription); the earlier ones see it again and skip what they have shown */
    int verbose = 1;
    if (type == ZMQ_XPUB && zmq_setsockopt(s, ZMQ_XPUB_VERBOSE, &verbose, sizeof verbose) != 0) {
        st_fail(ST_ECOMM, "monitor: cannot set up the %s socket: %s", what, zmq_strerror(zmq_errno()));
        zmq_close(s);
        return NULL;
    }
    if (st_zmq_socket_defaults(s, 200) != 0 || zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0 ||
        zmq_bind(s, addr) != 0) {
        st_fail(ST_ECOMM, "monitor: cannot bind %s socket to %s: %s", what, addr, zmq_strerror(zmq_errno()));
        zmq_close(s);
        return NULL;
    }
    return s;
}

/* ZMQ_LAST_ENDPOINT of a wildcard bind says 0.0.0.0: other hosts need this host's name instead. The
 * PUB and REP addresses are kept as bound (st_monitor_bound). Before the thread starts: see there. */
static void resolve_endpoint(st_monitor *m) {
    size_t sz = sizeof m->pub_endpoint;
    if (m->pub) zmq_getsockopt(m->pub, ZMQ_LAST_ENDPOINT, m->pub_endpoint, &sz);
    sz = sizeof m->rep_endpoint;
    if (m->rep) zmq_getsockopt(m->rep, ZMQ_LAST_ENDPOINT, m->rep_endpoint, &sz);
    sz = sizeof m->pull_endpoint;
    zmq_getsockopt(m->pull, ZMQ_LAST_ENDPOINT, m->pull_endpoint, &sz);
    const char *wild = "tcp://0.0.0.0:";
    if (!strncmp(m->pull_endpoint, wild, strlen(wild))) {
        char host[200] = "localhost", port[32];
        gethostname(host, sizeof host - 1);
        snprintf(port, sizeof port, "%s", m->pull_endpoint + strlen(wild));
        snprintf(m->pull_endpoint, sizeof m->pull_endpoint, "tcp://%s:%s", host, port);
    }
}

int st_monitor_start(const st_monitor_opts *o, st_monitor **out) {
    *out = NULL;
    if (!o || o->world_size < 1 || (!o->publish_addr && !o->control_addr))
        return st_fail(ST_EINVAL, "monitor: need world_size >= 1 and monitor.publish or monitor.control");
    if (o->token && *o->token && strlen(o->token) != ST_TOKEN_HEX)
        return st_fail(ST_EINVAL, "monitor: control token must be %d hex characters", ST_TOKEN_HEX);
    if (o->curve && (!o->curve_secret_z85 || strlen(o->curve_secret_z85) != ST_CURVE_KEY_LEN))
        return st_fail(ST_EINVAL, "monitor: monitor.curve needs the server secret key (%d Z85 characters)",
                       ST_CURVE_KEY_LEN);
    if (o->curve && !st_curve_available())
        return st_fail(ST_EINVAL, "monitor.curve: true, but this libzmq was built without CURVE (libsodium)");
    st_monitor *m = calloc(1, sizeof *m);
    if (!m) return st_fail(ST_ENOMEM, "monitor: out of memory");
    pthread_mutex_init(&m->lock, NULL);
    st_mailbox_clear(&m->events);
    m->world = o->world_size;
    m->stall_after_s = o->stall_after_s > 0 ? o->stall_after_s : 30;
    snprintf(m->token, sizeof m->token, "%s", o->token ? o->token : "");
    m->last_summary_step = -1;
    m->ranks = calloc((size_t)m->world, sizeof *m->ranks);
    m->strag_consecutive = calloc((size_t)m->world, sizeof(int));
    m->strag_raised = calloc((size_t)m->world, sizeof(int));
    m->strag_flag = calloc((size_t)m->world, sizeof(int));
    m->slots = calloc(ST_MON_SLOTS, sizeof *m->slots);
    int oom = !m->ranks || !m->strag_consecutive || !m->strag_raised || !m->strag_flag || !m->slots;
    for (int i = 0; !oom && i < ST_MON_SLOTS; i++) {
        m->slots[i].step = -1;
        m->slots[i].have = calloc((size_t)m->world, 1);
        m->slots[i].step_seconds = calloc((size_t)m->world, sizeof(double));
        oom = !m->slots[i].have || !m->slots[i].step_seconds;
    }
    if (oom) {
        destroy(m);
        return st_fail(ST_ENOMEM, "monitor: out of memory for %d ranks", o->world_size);
    }
    double now = st_now();
    for (int r = 0; r < m->world; r++) {
        m->ranks[r].rank = r;
        m->ranks[r].heard_at = now; /* a rank that never reports is flagged stall_after_s from now */
    }
    int rc = st_mailbox_init(&m->events, ST_MON_EVENTS, sizeof(st_event_item));
    m->ctx = zmq_ctx_new();
    if (rc || !m->ctx) {
        destroy(m);
        return st_fail(ST_ECOMM, "monitor: cannot create eventfd or ZeroMQ context");
    }
    const char *pull_addr = o->pull_bind && *o->pull_bind ? o->pull_bind : "tcp://127.0.0.1:*";
    const char *secret = o->curve ? o->curve_secret_z85 : NULL;
    /* PULL stays plain: only our own ranks connect to it, at an address they learn over MPI */
    if (!(m->pull = bound_socket(m, ZMQ_PULL, pull_addr, "PULL", NULL)) ||
        (o->publish_addr && !(m->pub = bound_socket(m, ZMQ_XPUB, o->publish_addr, "PUB (monitor.publish)", secret))) ||
        (o->control_addr && !(m->rep = bound_socket(m, ZMQ_REP, o->control_addr, "REP (monitor.control)", secret)))) {
        destroy(m);
        return ST_ECOMM;
    }
    resolve_endpoint(m);
    if (pthread_create(&m->thread, NULL, monitor_main, m) != 0) {
        destroy(m);
        return st_fail(ST_EIO, "monitor: cannot start thread");
    }
    *out = m;
    return 0;
}

void st_monitor_stop(st_monitor *m) {
    if (!m) return;
    atomic_store(&m->stopping, true);
    st_mailbox_wake(&m->events);
    pthread_join(m->thread, NULL);
    destroy(m);
}
