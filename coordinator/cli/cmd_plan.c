/* cmd_plan.c — `shardtune plan JOB.yaml --ranks N [--json] [--device-mem GiB] [dotted.key=value ...]`.
 *
 * Reads the job and the model's config.json (no weights are loaded or allocated: the registry alone is
 * built), then prints for every stage of the schedule the shard map and each rank's memory, and each
 * rank's memory per phase (load, step, checkpoint, final/) and of `export` (coordinator/trainer/plan.h).
 * --json prints one JSON object with exact byte counts. --device-mem says whether each rank fits in that
 * many GiB at every phase and, when one does not, what would make it fit (each change re-planned: ZeRO
 * stage 3, activation checkpointing, micro_batch 1, more ranks, finetune.mode lora). No MPI. */
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
    fprintf(stderr, "usage: shardtune plan JOB.yaml --ranks N [--json] [--device-mem GiB] [dotted.key=value ...]\n");
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

static void print_text(const st_plan *p, const st_model *m, const st_config *c) {
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
        if (sp->ranks[0].teacher)
            printf("  distill.teacher: %.2f MiB per rank (in total)\n", mib(sp->ranks[0].teacher));
        if (sp->transition_extra)
            printf("  entering this stage: +%.2f MiB per rank (re-sharding: the previous stage's moments; ZeRO-3: "
                   "its weights)\n",
                   mib(sp->transition_extra));
    }
    printf("\nper phase (MiB): load (first stage), step (largest stage total), checkpoint, final/ (end of stage %d)\n",
           p->final_stage);
    printf("  %4s %10s %10s %10s %10s %10s %10s\n", "rank", "load", "step", "checkpoint", "final/", "peak", "resume");
    for (int r = 0; r < p->world; r++) {
        size_t step = 0, ck = 0;
        for (int s = 0; s < p->n_stages; s++) {
            if (p->stages[s].ranks[r].total > step) step = p->stages[s].ranks[r].total;
            if (p->stages[s].ranks[r].at_ckpt > ck) ck = p->stages[s].ranks[r].at_ckpt;
        }
        printf("  %4d %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f\n", r, mib(p->stages[0].ranks[r].at_load), mib(step),
               mib(ck), mib(p->stages[p->final_stage].ranks[r].at_save), mib(p->rank_peak[r]),
               mib(p->stages[0].ranks[r].at_resume));
    }
    printf("loading: %s\n", st_plan_streams(c) ? "each rank reads its own parts of the safetensors (streamed)"
                            : st_plan_qload_sharded(c, c->backend == ST_BACKEND_CUDA)
                                ? "each rank quantizes only its part of the codes and reads its own parts of the kept "
                                  "base (ranged reads)"
                            : p->zero_stage == 3 ? "every rank reads the whole model, then keeps its parts"
                            : st_plan_loads_late(c) && c->precision == ST_PRECISION_BF16
                                ? "every rank reads the whole model, a tensor at a time, the frozen BF16 tensors straight "
                                  "into their bf16 copy (no fp32 copy of them)"
                                                 : "every rank reads the whole model, a tensor at a time");
    printf("writing final/: rank 0 holds %.2f MiB (one tensor at a time)\n",
           mib(p->stages[p->final_stage].ranks[0].at_save));
    printf("shardtune export of its checkpoint: %.2f MiB (one tensor at a time)\n", mib(p->export_bytes));
    printf("peak per rank: %.2f MiB (%zu bytes); resuming from a checkpoint adds its own phase (resume column)\n",
           mib(p->peak), p->peak);
    if (p->stages[0].ranks[0].host_snapshot)
        printf("checkpoint.async: rank 0 also keeps %.2f MiB of host memory for its snapshot (not in the device "
               "figures above)\n", mib(p->stages[0].ranks[0].host_snapshot));
    const st_rank_plan *h = &p->stages[p->final_stage].ranks[0];
    if (h->host_save || h->host_resume)
        printf("host memory beside the device figures: rank 0 writing final/ %.2f MiB, resume %.2f MiB\n",
               mib(h->host_save), mib(h->host_resume));
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
                        "\"buffers\":%zu,\"total\":%zu,\"at_save\":%zu,\"at_load\":%zu,\"at_ckpt\":%zu,"
                        "\"at_resume\":%zu,\"host_snapshot\":%zu,\"host_save\":%zu,\"host_resume\":%zu,"
                        "\"teacher\":%zu,\"enter_fp32\":%zu}}%s",
                     rp->weights, rp->grads, rp->optim, rp->comm, rp->activations, rp->buffers, rp->total, rp->at_save,
                     rp->at_load, rp->at_ckpt, rp->at_resume, rp->host_snapshot, rp->host_save, rp->host_resume,
                     rp->teacher, rp->enter_fp32,
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
                         "\"save_extra_bytes\":%zu,\"load_bytes\":%zu,\"peak_bytes\":%zu,",
                     p->world, p->zero_stage, p->micro_batch, p->grad_accum, p->seq_len,
                     st_precision_name(p->precision), p->act_ckpt ? "true" : "false", p->final_stage, p->save_extra, p->load_bytes,
                     p->peak);
    st_strbuf_printf(&b, "\"export_bytes\":%zu,\"rank_peak_bytes\":[", p->export_bytes);
    for (int r = 0; r < p->world; r++) st_strbuf_printf(&b, "%s%zu", r ? "," : "", p->rank_peak[r]);
    st_strbuf_printf(&b, "],\"stages\":[");
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

/* ---- --device-mem: fit check and what to change ---- */

static double gib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

/* The peak of `cfg` on `ranks` ranks (a fresh registry with cfg's adapters); 0 with st_error() set when it
 * does not plan (the change is not possible for this job). */
static size_t plan_peak(const st_config *cfg, const st_model_config *mc, int ranks) {
    st_model m;
    if (st_model_build_registry(&m, mc)) return 0;
    size_t peak = 0;
    st_plan p;
    if (!st_plan_attach_adapters(cfg, &m) && !st_plan_build(cfg, &m, ranks, &p)) {
        peak = p.peak;
        st_plan_free(&p);
    }
    st_model_free(&m);
    return peak;
}

/* The phase where rank r peaks. */
static const char *peak_phase(const st_plan *p, int r) {
    size_t peak = p->rank_peak[r];
    if (p->stages[p->final_stage].ranks[r].at_save == peak) return "writing final/";
    for (int s = 0; s < p->n_stages; s++)
        if (p->stages[s].ranks[r].at_ckpt == peak) return "writing a checkpoint";
    if (p->stages[0].ranks[r].at_load == peak) return "loading";
    return "in a training step";
}

typedef struct { char text[160]; size_t peak; int ok; } fix;

/* One change to try: applies it to *c (a copy), re-plans; ranks may change too. */
static void try_fix(fix *f, const st_config *c, const st_model_config *mc, int ranks, size_t limit) {
    f->peak = plan_peak(c, mc, ranks);
    f->ok = f->peak && f->peak <= limit;
}

static void advise(const st_config *cfg, const st_model_config *mc, const st_plan *p, size_t limit) {
    int bad = 0;
    for (int r = 0; r < p->world; r++) bad += p->rank_peak[r] > limit;
    printf("\ndevice memory %.2f GiB per rank:\n", gib(limit));
    if (!bad) {
        printf("  fits: every rank's peak (%.2f GiB) is within it at every phase (load, step, checkpoint, final/)\n",
               gib(p->peak));
        if (p->export_bytes > limit) printf("  but shardtune export needs %.2f GiB\n", gib(p->export_bytes));
        for (int r = 0; r < p->world; r++)
            if (p->stages[0].ranks[r].at_resume > limit) {
                printf("  but resuming from a checkpoint does not: rank %d needs %.2f GiB then (the weights it reads and "
                       "a host copy of its moments)\n", r, gib(p->stages[0].ranks[r].at_resume));
                break;
            }
        return;
    }
    for (int r = 0, shown = 0; r < p->world && shown < 8; r++)
        if (p->rank_peak[r] > limit) {
            size_t step = 0, ck = 0;
            for (int s = 0; s < p->n_stages; s++) {
                if (p->stages[s].ranks[r].total > step) step = p->stages[s].ranks[r].total;
                if (p->stages[s].ranks[r].at_ckpt > ck) ck = p->stages[s].ranks[r].at_ckpt;
            }
            printf("  rank %d does not fit: %.2f GiB at its peak, %s (load %.2f, step %.2f, checkpoint %.2f, final/ "
                   "%.2f GiB)\n", r, gib(p->rank_peak[r]), peak_phase(p, r), gib(p->stages[0].ranks[r].at_load),
                   gib(step), gib(ck), gib(p->stages[p->final_stage].ranks[r].at_save));
            shown++;
        }
    if (bad > 8) printf("  (%d ranks in all do not fit)\n", bad);
    printf("  what would fit (each change re-planned):\n");
    static st_config c, all; /* large: off the stack */
    fix f;
    int ranks = p->world, full = cfg->finetune.mode == ST_FINETUNE_FULL || cfg->finetune.mode == ST_FINETUNE_FROZEN;
    all = *cfg;
    if (cfg->sharding.stage < 3 && full) {
        c = *cfg;
        c.sharding.stage = 3;
        all.sharding.stage = 3;
        try_fix(&f, &c, mc, ranks, limit);
        if (f.peak) printf("    sharding.stage=3: %.2f GiB%s\n", gib(f.peak), f.ok ? " (fits)" : "");
    }
    if (!cfg->memory.activation_checkpointing) {
        c = *cfg;
        c.memory.activation_checkpointing = 1;
        all.memory.activation_checkpointing = 1;
        try_fix(&f, &c, mc, ranks, limit);
        if (f.peak) printf("    memory.activation_checkpointing=true: %.2f GiB%s\n", gib(f.peak), f.ok ? " (fits)" : "");
    }
    if (cfg->train.micro_batch > 1) {
        c = *cfg;
        c.train.grad_accum = cfg->train.grad_accum * cfg->train.micro_batch;
        c.train.micro_batch = 1;
        all.train.grad_accum = c.train.grad_accum;
        all.train.micro_batch = 1;
        try_fix(&f, &c, mc, ranks, limit);
        if (f.peak)
            printf("    train.micro_batch=1 train.grad_accum=%d (same global batch): %.2f GiB%s\n", c.train.grad_accum,
                   gib(f.peak), f.ok ? " (fits)" : "");
    }
    if (cfg->sharding.stage >= 1) { /* more ranks shrink the shards (stages 1-3) */
        int n = ranks * 2;
        for (; n <= 65536; n *= 2) {
            try_fix(&f, cfg, mc, n, limit);
            if (f.ok) { printf("    --ranks %d: %.2f GiB (fits)\n", n, gib(f.peak)); break; }
        }
        if (n > 65536) printf("    more ranks alone: no count up to 65536 fits (what each rank replicates is too large)\n");
    }
    if (full) {
        c = *cfg;
        c.finetune.mode = ST_FINETUNE_LORA;
        if (c.sharding.stage > 2) c.sharding.stage = 2; /* lora trains at stages 0-2 */
        try_fix(&f, &c, mc, ranks, limit);
        if (f.peak)
            printf("    finetune.mode=lora%s: %.2f GiB%s\n", cfg->sharding.stage > 2 ? " sharding.stage=2" : "",
                   gib(f.peak), f.ok ? " (fits)" : "");
    }
    /* the memory changes together (they keep the full fine-tune), then the fewest ranks that fit */
    try_fix(&f, &all, mc, ranks, limit);
    int n = ranks;
    while (!f.ok && f.peak && all.sharding.stage >= 1 && n < 65536) try_fix(&f, &all, mc, n *= 2, limit);
    if (f.ok)
        printf("    together: sharding.stage=%d memory.activation_checkpointing=%s train.micro_batch=%d on %d ranks: "
               "%.2f GiB (fits)\n", all.sharding.stage, all.memory.activation_checkpointing ? "true" : "false",
               all.train.micro_batch, n, gib(f.peak));
    else
        printf("    no full fine-tune of this model fits on up to 65536 ranks of %.2f GiB: train an adapter\n", gib(limit));
}

int st_cmd_plan(int argc, char **argv) {
    const char *job = NULL;
    int ranks = 0, json = 0, n_over = 0;
    double device_gib = 0;
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
        } else if (!strcmp(a, "--device-mem") && i + 1 < argc) {
            char *end = NULL;
            device_gib = strtod(argv[++i], &end);
            if (!end || *end || !(device_gib > 0) || device_gib > 1e6) {
                free(over);
                fprintf(stderr, "shardtune plan: error: --device-mem '%s' is not a positive number of GiB\n", argv[i]);
                return ST_EXIT_USAGE;
            }
        } else if (!strcmp(a, "--json")) json = 1;
        else if (a[0] == '-') { free(over); st_cli_bad_arg("plan", a); return usage(); }
        else if (!job) job = a;
        else if (strchr(a, '=')) over[n_over++] = argv[i];
        else { free(over); st_cli_bad_arg("plan", a); return usage(); }
    }
    if (!job || ranks < 1) { free(over); st_cli_missing("plan", !job ? "JOB.yaml" : "--ranks N"); return usage(); }
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
        else print_text(&p, &m, &cfg);
        if (!rc && !json && device_gib > 0) advise(&cfg, &mc, &p, (size_t)(device_gib * 1024.0 * 1024.0 * 1024.0));
        st_plan_free(&p);
    }
    if (rc) st_cli_error("plan", st_error());
    st_model_free(&m);
    fflush(stdout);
    return rc ? ST_EXIT_FAIL : ST_EXIT_OK;
}
