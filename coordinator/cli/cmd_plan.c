/* cmd_plan.c — `shardtune plan JOB.yaml --ranks N [--json] [dotted.key=value ...]`.
 *
 * Reads the job and the model's config.json (no weights are loaded or allocated: the registry alone is
 * built), then prints for every stage of the schedule the shard map and each rank's memory
 * (coordinator/trainer/plan.h). --json prints one JSON object with exact byte counts. No MPI. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_dir.h"
#include "common/error.h"
#include "common/json.h"
#include "coordinator/cli/commands.h"
#include "coordinator/config/config.h"
#include "coordinator/trainer/plan.h"
#include "worker/model.h"

static int usage(void) {
    fprintf(stderr, "usage: shardtune plan JOB.yaml --ranks N [--json] [dotted.key=value ...]\n");
    return ST_EXIT_USAGE;
}

static void modules_text(unsigned mods, char *out, size_t n) {
    out[0] = 0;
    for (unsigned bit = 1; bit <= ST_MOD_HEAD; bit <<= 1) {
        if (!(mods & bit)) continue;
        size_t len = strlen(out);
        snprintf(out + len, n - len, "%s%s", len ? "," : "", st_module_name(bit));
    }
    if (mods & ST_MOD_LORA) snprintf(out + strlen(out), n - strlen(out), "%slora", out[0] ? "," : "");
}

static double mib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

static void print_text(const st_plan *p, const st_model *m) {
    const st_model_config *mc = &m->cfg;
    printf("model: %s %d layers, dim %d, heads %d/%d, ffn %d, vocab %d | %zu floats (%.2f MiB fp32) in %d tensors\n",
           mc->model_type, mc->n_layer, mc->d_model, mc->n_head, mc->n_kv_head, mc->d_ff, mc->vocab, p->n_weights,
           mib(p->n_weights * sizeof(float)), p->n_params);
    printf("run: %d rank(s), ZeRO stage %d, micro_batch %d x seq_len %d, grad_accum %d (global batch %d), %s%s\n",
           p->world, p->zero_stage, p->micro_batch, p->seq_len, p->grad_accum,
           p->world * p->micro_batch * p->grad_accum, st_precision_name(p->precision),
           p->act_ckpt ? ", activation checkpointing" : "");
    for (int s = 0; s < p->n_stages; s++) {
        const st_stage_plan *sp = &p->stages[s];
        char mods[64];
        modules_text(sp->modules, mods, sizeof mods);
        printf("\nstage %d from step %lld: train_layers \"%s\", modules %s: %zu trainable floats in %d tensors, "
               "padded to %zu, shard %zu per rank\n",
               s, (long long)sp->at_step, sp->layers_spec, mods, sp->n_trainable, sp->n_trainable_params, sp->n_pad,
               sp->shard);
        printf("  %4s  %-23s %6s  %9s %9s %9s %9s %9s %9s %10s  %s\n", "rank", "shard [lo, hi)", "params", "weights",
               "grads", "optim", "comm", "activ", "buffers", "total MiB", "first .. last parameter");
        for (int r = 0; r < p->world; r++) {
            const st_rank_plan *rp = &sp->ranks[r];
            char range[48];
            snprintf(range, sizeof range, "[%zu, %zu)", rp->lo, rp->hi);
            printf("  %4d  %-23s %6d  %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %10.2f  ", r, range, rp->n_params,
                   mib(rp->weights), mib(rp->grads), mib(rp->optim), mib(rp->comm), mib(rp->activations),
                   mib(rp->buffers), mib(rp->total));
            if (rp->first_param < 0) printf("(padding only)\n");
            else printf("%s .. %s\n", m->params[rp->first_param].name, m->params[rp->last_param].name);
        }
        if (sp->transition_extra)
            printf("  entering this stage: +%.2f MiB per rank (the previous stage's moments, gathered)\n",
                   mib(sp->transition_extra));
    }
    printf("\nloading (every rank, the whole model and gradient buffer before sharding): %.2f MiB\n",
           mib(p->load_bytes));
    printf("writing final/ (rank 0, end of stage %d): +%.2f MiB\n", p->final_stage, mib(p->save_extra));
    printf("peak per rank: %.2f MiB (%zu bytes)\n", mib(p->peak), p->peak);
}

static void json_rank(st_strbuf *b, const st_plan *p, const st_stage_plan *sp, int r, const st_model *m,
                      const long *goff) {
    const st_rank_plan *rp = &sp->ranks[r];
    st_strbuf_printf(b, "{\"rank\":%d,\"lo\":%zu,\"hi\":%zu,\"n_params\":%d,\"params\":[", r, rp->lo, rp->hi,
                     rp->n_params);
    int first = 1;
    for (int i = 0; i < m->n_params; i++) {
        if (goff[i] < 0) continue;
        size_t a = (size_t)goff[i], e = a + m->params[i].numel;
        if (a >= rp->hi || e <= rp->lo) continue;
        if (!first) st_strbuf_append(b, ",", 1);
        first = 0;
        st_strbuf_json_string(b, m->params[i].name);
    }
    st_strbuf_printf(b, "],\"bytes\":{\"weights\":%zu,\"grads\":%zu,\"optim\":%zu,\"comm\":%zu,\"activations\":%zu,"
                        "\"buffers\":%zu,\"total\":%zu,\"at_save\":%zu}}%s",
                     rp->weights, rp->grads, rp->optim, rp->comm, rp->activations, rp->buffers, rp->total, rp->at_save,
                     r + 1 < p->world ? "," : "");
}

static int print_json(const st_plan *p, const st_model *m, const st_config *c) {
    const st_model_config *mc = &m->cfg;
    st_stage_list stages;
    int rc = st_plan_stages(c, m, &stages);
    if (rc) return rc;
    long *goff = malloc((size_t)m->n_params * sizeof(long));
    if (!goff) {
        st_stage_list_free(&stages);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\"model\":{\"model_type\":");
    st_strbuf_json_string(&b, mc->model_type);
    st_strbuf_printf(&b, ",\"n_layer\":%d,\"d_model\":%d,\"n_head\":%d,\"n_kv_head\":%d,\"d_ff\":%d,\"vocab\":%d,"
                         "\"max_seq\":%d,\"n_weights\":%zu,\"n_params\":%d},",
                     mc->n_layer, mc->d_model, mc->n_head, mc->n_kv_head, mc->d_ff, mc->vocab, mc->max_seq,
                     p->n_weights, p->n_params);
    st_strbuf_printf(&b, "\"world\":%d,\"zero_stage\":%d,\"micro_batch\":%d,\"grad_accum\":%d,\"seq_len\":%d,"
                         "\"precision\":\"%s\",\"activation_checkpointing\":%s,\"final_stage\":%d,"
                         "\"save_extra_bytes\":%zu,\"load_bytes\":%zu,\"peak_bytes\":%zu,\"stages\":[",
                     p->world, p->zero_stage, p->micro_batch, p->grad_accum, p->seq_len,
                     st_precision_name(p->precision), p->act_ckpt ? "true" : "false", p->final_stage, p->save_extra, p->load_bytes,
                     p->peak);
    for (int s = 0; s < p->n_stages; s++) {
        const st_stage_plan *sp = &p->stages[s];
        st_model_grad_offsets(m, stages.stages[s].layers, stages.stages[s].modules, goff);
        st_strbuf_printf(&b, "{\"stage\":%d,\"at_step\":%lld,\"train_layers\":", s, (long long)sp->at_step);
        st_strbuf_json_string(&b, sp->layers_spec);
        st_strbuf_printf(&b, ",\"layers\":[");
        for (int l = 0, n = 0; l < mc->n_layer; l++)
            if (stages.stages[s].layers[l]) st_strbuf_printf(&b, "%s%d", n++ ? "," : "", l);
        st_strbuf_printf(&b, "],\"modules\":[");
        for (unsigned bit = 1, n = 0; bit <= ST_MOD_HEAD; bit <<= 1)
            if (sp->modules & bit) st_strbuf_printf(&b, "%s\"%s\"", n++ ? "," : "", st_module_name(bit));
        if (sp->modules & ST_MOD_LORA) st_strbuf_printf(&b, "%s\"lora\"", sp->modules & ST_MOD_ALL ? "," : "");
        st_strbuf_printf(&b, "],\"trainable\":%zu,\"trainable_params\":%d,\"padded\":%zu,\"shard\":%zu,"
                             "\"transition_extra_bytes\":%zu,\"ranks\":[",
                         sp->n_trainable, sp->n_trainable_params, sp->n_pad, sp->shard, sp->transition_extra);
        for (int r = 0; r < p->world; r++) json_rank(&b, p, sp, r, m, goff);
        st_strbuf_printf(&b, "]}%s", s + 1 < p->n_stages ? "," : "");
    }
    st_strbuf_append(&b, "]}\n", 3);
    if (b.data) fputs(b.data, stdout);
    st_strbuf_free(&b);
    free(goff);
    st_stage_list_free(&stages);
    return 0;
}

int st_cmd_plan(int argc, char **argv) {
    const char *job = NULL;
    int ranks = 0, json = 0, n_over = 0;
    char **over = calloc((size_t)argc + 1, sizeof *over);
    if (!over) return st_cli_error("plan", "out of memory");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--ranks") && i + 1 < argc) {
            char *end = NULL;
            long v = strtol(argv[++i], &end, 10);
            if (!end || *end || v < 1 || v > 1000000) {
                free(over);
                fprintf(stderr, "shardtune plan: error: --ranks '%s' is not a positive integer\n", argv[i]);
                return ST_EXIT_USAGE;
            }
            ranks = (int)v;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (a[0] == '-') { free(over); return usage(); }
        else if (!job) job = a;
        else if (strchr(a, '=')) over[n_over++] = argv[i];
        else { free(over); return usage(); }
    }
    if (!job || ranks < 1) { free(over); return usage(); }
    static st_config cfg; /* large (fixed arrays): keep it off the stack */
    int rc = st_config_load(&cfg, job, n_over, over);
    free(over);
    if (rc) return st_cli_error("plan", st_error());
    st_model_config mc;
    rc = st_model_config_read(cfg.model.path, &mc);
    if (rc) {
        char msg[1400];
        snprintf(msg, sizeof msg, "model.path %s: %s", cfg.model.path, st_error());
        return st_cli_error("plan", msg);
    }
    st_model m;
    rc = st_model_build_registry(&m, &mc);
    if (!rc && (rc = st_plan_attach_adapters(&cfg, &m))) st_model_free(&m);
    if (rc) return st_cli_error("plan", st_error());
    st_plan p;
    rc = st_plan_build(&cfg, &m, ranks, &p);
    if (!rc) {
        if (json) rc = print_json(&p, &m, &cfg);
        else print_text(&p, &m);
        st_plan_free(&p);
    }
    if (rc) st_cli_error("plan", st_error());
    st_model_free(&m);
    fflush(stdout);
    return rc ? ST_EXIT_FAIL : ST_EXIT_OK;
}
