/* train_report.c — what a step leaves behind: metrics.jsonl and the console line (rank 0), the
 * telemetry step report (every rank). */
#include "coordinator/trainer/train_internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"

/* ---------------- reporting (rank 0) ---------------- */

static void json_number(st_strbuf *b, const char *key, double v) {
    if (isfinite(v)) st_strbuf_printf(b, ",\"%s\":%.9g", key, v);
    else st_strbuf_printf(b, ",\"%s\":null", key);
}

static void json_task_map(st_strbuf *b, const trainer *t, const char *key, int which) {
    st_strbuf_printf(b, ",\"%s\":{", key);
    for (int k = 0; k < t->n_tasks; k++) {
        double cnt = t->task_sums[3 * k + 1];
        st_strbuf_json_string(b, t->cfg->tasks[k].name);
        if (which == 0) {
            if (cnt > 0 && isfinite(t->task_sums[3 * k] / cnt))
                st_strbuf_printf(b, ":%.9g%s", t->task_sums[3 * k] / cnt, k + 1 < t->n_tasks ? "," : "");
            else st_strbuf_printf(b, ":null%s", k + 1 < t->n_tasks ? "," : "");
        } else {
            st_strbuf_printf(b, ":%.0f%s", t->task_sums[3 * k + 2], k + 1 < t->n_tasks ? "," : "");
        }
    }
    st_strbuf_append(b, "}", 1);
}

/* Every rank: the step report its telemetry thread pushes to rank 0. */
static void report_telemetry(trainer *t, int64_t step, const st_step_result *r, double mfu) {
    const st_config *c = t->cfg;
    if (t->tel) {
        st_step_report rep;
        memset(&rep, 0, sizeof rep);
        rep.step = step + 1;
        rep.loss = r->loss;
        rep.step_seconds = r->seconds;
        rep.comm_seconds = r->comm_seconds;
        rep.tokens = (uint64_t)t->slots * t->T;
        rep.ntasks = t->n_tasks < ST_TELEMETRY_MAX_TASKS ? t->n_tasks : ST_TELEMETRY_MAX_TASKS;
        for (int k = 0; k < rep.ntasks; k++) {
            snprintf(rep.task_name[k], sizeof rep.task_name[k], "%s", c->tasks[k].name);
            double cnt = t->task_sums[3 * k + 1];
            rep.task_loss[k] = cnt > 0 ? t->task_sums[3 * k] / cnt : 0;
            rep.task_tokens[k] = (uint64_t)t->task_sums[3 * k + 2];
        }
        rep.grad_norm = r->grad_norm;
        rep.lr = r->lr;
        rep.mfu = mfu;
        rep.stage = t->stage;
        st_telemetry_report(t->tel, &rep);
    }
}

/* Rank 0: one line of metrics.jsonl. */
static void report_metrics(trainer *t, int64_t step, const st_step_result *r, const double *val, double tps,
                           double mfu) {
    const st_config *c = t->cfg;
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\"step\":%lld", (long long)step + 1);
    json_number(&b, "loss", r->loss); /* JSON has no nan: a non-finite value is null */
    st_strbuf_printf(&b, ",\"lr\":%.9g", (double)r->lr);
    json_number(&b, "grad_norm", r->grad_norm);
    st_strbuf_printf(&b, ",\"tokens\":%llu,\"tokens_per_s\":%.1f,\"mfu\":%.4f,\"step_ms\":%.3f,\"comm_ms\":%.3f,\"stage\":%d",
                     (unsigned long long)t->tokens_seen, tps, mfu, r->seconds * 1e3, r->comm_seconds * 1e3, t->stage);
    if (c->train.epochs > 0) st_strbuf_printf(&b, ",\"total_steps\":%lld", (long long)c->train.steps); /* resolved */
    if (step == t->start_step && step > 0) st_strbuf_printf(&b, ",\"resumed\":true"); /* for plot */
    if (r->bad) {
        st_strbuf_printf(&b, ",\"skipped\":");
        st_strbuf_json_string(&b, r->bad);
    }
    if (t->kd_on) {
        json_number(&b, "ce_loss", r->ce_loss);
        json_number(&b, "kd_loss", r->kd_loss);
        st_strbuf_printf(&b, ",\"teacher_ms\":%.3f", r->teacher_seconds * 1e3);
    }
    json_task_map(&b, t, "task_loss", 0);
    json_task_map(&b, t, "task_tokens", 1);
    if (t->taskw.learned) {
        st_strbuf_printf(&b, ",\"task_weight\":{");
        for (int k = 0; k < t->n_tasks; k++) {
            st_strbuf_json_string(&b, c->tasks[k].name);
            st_strbuf_printf(&b, ":%.9g%s", c->tasks[k].loss_weight * st_taskw_scale(&t->taskw, k),
                             k + 1 < t->n_tasks ? "," : "");
        }
        st_strbuf_append(&b, "}", 1);
    }
    if (val) {
        st_strbuf_append(&b, ",\"val_loss\":{", 13);
        for (int k = 0; k < t->n_tasks; k++) {
            st_strbuf_json_string(&b, c->tasks[k].name);
            if (!isfinite(val[k])) st_strbuf_printf(&b, ":null");
            else st_strbuf_printf(&b, ":%.9g", val[k]);
            if (k + 1 < t->n_tasks) st_strbuf_append(&b, ",", 1);
        }
        st_strbuf_append(&b, "}", 1);
    }
    /* held until the step boundary is over: a checkpoint there adds ckpt_blocked_ms to this line */
    st_trainer_metrics_flush(t);
    t->metrics_held = b;
}

void st_trainer_metrics_flush(trainer *t) {
    st_strbuf *b = &t->metrics_held;
    if (t->ckpt_blocked_ms >= 0 && b->data) st_strbuf_printf(b, ",\"ckpt_blocked_ms\":%.3f", t->ckpt_blocked_ms);
    t->ckpt_blocked_ms = -1;
    if (!b->data) return;
    st_strbuf_append(b, "}\n", 2);
    if (b->data && t->metrics) {
        fputs(b->data, t->metrics);
        fflush(t->metrics);
    }
    st_strbuf_free(b);
    memset(b, 0, sizeof *b);
}

/* Rank 0: the console line every train.log_every steps and at the last step. */
static void report_console(const trainer *t, int64_t step, const st_step_result *r, const double *val, double tps,
                           double mfu) {
    const st_config *c = t->cfg;
    if (c->train.log_every > 0 && ((step + 1) % c->train.log_every == 0 || step + 1 == c->train.steps)) {
        printf("step %5lld/%lld | loss %.4f | lr %.2e | gnorm %.3f | %.0f tok/s | MFU %.0f%% | %.0f ms",
               (long long)step + 1, (long long)c->train.steps, r->loss, (double)r->lr, r->grad_norm, tps, 100 * mfu,
               r->seconds * 1e3);
        if (t->stages.n > 1) printf(" | stage %d", t->stage);
        if (r->bad) printf(" | skipped (%s)", r->bad);
        for (int k = 0; t->n_tasks > 1 && k < t->n_tasks; k++) {
            double cnt = t->task_sums[3 * k + 1];
            if (cnt > 0) printf(" | %s %.4f", c->tasks[k].name, t->task_sums[3 * k] / cnt);
        }
        if (val)
            for (int k = 0; k < t->n_tasks; k++) printf(" | val[%s] %.4f", c->tasks[k].name, val[k]);
        printf("\n");
        fflush(stdout);
    }
}

void st_trainer_report(trainer *t, int64_t step, const st_step_result *r, const double *val, const double *val_n) {
    uint64_t step_tokens = (uint64_t)t->world * t->slots * t->T;
    double tps = step_tokens / r->seconds;
    /* FLOPs utilization of the step as performed (frozen layers, adapters, recomputation, attention) */
    /* the FLOPs the step performs (st_model_step_flops), with a distillation teacher's forward */
    double fpt = st_model_flops_per_token(&t->model, t->T);
    if (t->kd_on && t->teacher.B * t->teacher.T > 0)
        fpt += st_model_step_flops(&t->teacher, 0) / ((double)t->teacher.B * t->teacher.T);
    double mfu = t->peak_flops > 0 ? fpt * tps / t->peak_flops : 0.0;
    (void)val_n;
    report_telemetry(t, step, r, mfu);
    if (t->rank != 0) return;
    report_metrics(t, step, r, val, tps, mfu);
    report_console(t, step, r, val, tps, mfu);
}


void st_trainer_banner(const trainer *t) {
    if (t->rank != 0) return;
    const st_config *c = t->cfg;
    const st_model_config *mc = &t->model.cfg;
    printf("shardtune: %s %d layers, dim %d, heads %d/%d, vocab %d | %.2fM params, %.2fM trainable | "
           "%d rank(s) x %d thread(s), backend %s | global batch %d x %d tokens | %d task(s)\n",
           mc->model_type, mc->n_layer, mc->d_model, mc->n_head, mc->n_kv_head, mc->vocab,
           t->model.n_weights / 1e6, t->model.n_grads / 1e6, t->world,
           c->threads > 0 ? c->threads : st_num_threads(), t->be->name, t->world * t->slots, t->T, t->n_tasks);
    /* what the mixture will actually sample, so a mis-set weight is seen before the first step */
    double p[ST_CFG_MAX_TASKS];
    st_loader_probabilities(&t->loader, p);
    printf("tasks (mixing %s):", st_mixing_name(c->mixing.strategy));
    for (int k = 0; k < t->n_tasks; k++) printf("%s %s p=%.4f", k ? "," : "", c->tasks[k].name, p[k]);
    printf("\n");
    fflush(stdout);
}

/* Rank 0: drops metrics.jsonl rows of steps after `keep_upto` (steps a crashed run logged after its last
 * checkpoint, or a whole earlier run when starting fresh), so the file reads as one run. */
int st_trainer_trim_metrics(trainer *t, int64_t keep_upto) {
    if (t->rank != 0 || !t->metrics) return 0;
    char path[ST_CFG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", t->cfg->run_dir);
    char *text = NULL;
    size_t len = 0;
    fflush(t->metrics);
    if (st_read_file(path, &text, &len)) return 0; /* nothing to trim */
    st_strbuf keep = {0};
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        size_t n = nl ? (size_t)(nl - line) + 1 : strlen(line);
        st_json *row = NULL;
        int ok = st_json_parse(line, nl ? (size_t)(nl - line) : n, &row) == 0 &&
                 st_json_get_int(row, "step", INT64_MAX, NULL) <= keep_upto;
        if (ok) st_strbuf_append(&keep, line, n);
        st_json_free(row);
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    int rc = st_write_file_atomic(path, keep.data ? keep.data : "", keep.len);
    st_strbuf_free(&keep);
    if (rc) return rc;
    fclose(t->metrics);
    t->metrics = fopen(path, "a");
    return t->metrics ? 0 : st_fail(ST_EIO, "cannot reopen %s", path);
}
