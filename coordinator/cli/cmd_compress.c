/* cmd_compress.c — `shardtune compress --model DIR --out DIR [--drop-layers SPEC] [--prune-heads F]
 * [--prune-ffn F] [--calib DATA.h5] [--seq-len T] [--calib-windows N] [--batch B]`: structured pruning
 * (worker/prune.h) into a smaller Hugging Face model directory, with the loss on the calibration windows
 * before and after, and DIR/compress_report.json (importances and what was kept; docs/compress.md).
 * SPEC: layers as in finetune.train_layers ("3,5-6", "-2") or "auto:K" (the K of lowest block influence). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/cli/commands.h"
#include "coordinator/config/config.h"
#include "kernels/kernels.h"
#include "worker/dataset.h"
#include "worker/prune.h"

typedef struct {
    const char *model, *out, *drop, *calib;
    double heads, ffn;
    int T, windows, B, force;
} opts;

static int usage(void) {
    fprintf(stderr, "usage: shardtune compress --model DIR --out DIR [--drop-layers SPEC|auto:K] [--prune-heads F] "
                    "[--prune-ffn F] [--calib DATA.h5] [--seq-len T] [--calib-windows N] [--batch B] [--force]\n"
                    "(an existing non-empty OUT is refused unless --force; it is written aside, then renamed)\n");
    return ST_EXIT_USAGE;
}

/* The first n windows of T+1 tokens (stride T) of the dataset, as eval reads them. */
typedef struct { int32_t *in, *tg; float *w; int n; } windows;

static int make_windows(const st_dataset *d, int T, int want, int vocab, windows *w) {
    uint64_t avail = d->n_tokens > (uint64_t)T ? (d->n_tokens - 1) / (uint64_t)T : 0;
    if (avail == 0) return st_fail(ST_EINVAL, "calibration data has fewer than seq-len + 1 = %d tokens", T + 1);
    w->n = avail < (uint64_t)want ? (int)avail : want;
    size_t n = (size_t)w->n * T;
    w->in = malloc(n * sizeof(int32_t));
    w->tg = malloc(n * sizeof(int32_t));
    w->w = malloc(n * sizeof(float));
    if (!w->in || !w->tg || !w->w) return st_fail(ST_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        uint64_t pos = i / T * (uint64_t)T + i % T;
        if ((int64_t)d->tokens[pos] >= vocab || (int64_t)d->tokens[pos + 1] >= vocab)
            return st_fail(ST_EINVAL, "calibration token at index %llu is outside the model's vocabulary (%d)",
                           (unsigned long long)pos, vocab);
        w->in[i] = (int32_t)d->tokens[pos];
        w->tg[i] = (int32_t)d->tokens[pos + 1];
        w->w[i] = d->loss_mask[pos + 1] ? 1.0f : 0.0f;
    }
    return 0;
}

static void json_array(st_strbuf *b, const char *key, const double *v, int n, const int *iv) {
    if (key) st_strbuf_printf(b, "\"%s\": ", key);
    st_strbuf_printf(b, "[");
    for (int i = 0; i < n; i++) {
        if (iv) st_strbuf_printf(b, "%s%d", i ? ", " : "", iv[i]);
        else st_strbuf_printf(b, "%s%.9g", i ? ", " : "", v[i]);
    }
    st_strbuf_printf(b, "]");
}

static int write_report(const char *dir, const st_prune_stats *s, const st_prune_plan *p, double before, double after) {
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\"loss_before\": %.9g, \"loss_after\": %.9g, ", before, after);
    json_array(&b, "kept_layers", NULL, p->n_layer, p->layers);
    if (s && s->layer_bi) {
        st_strbuf_printf(&b, ", ");
        json_array(&b, "layer_block_influence", s->layer_bi, s->L, NULL);
        st_strbuf_printf(&b, ", \"group_score\": [");
        for (int l = 0; l < s->L; l++) {
            st_strbuf_printf(&b, "%s[", l ? ", " : "");
            for (int g = 0; g < s->G; g++) st_strbuf_printf(&b, "%s%.9g", g ? ", " : "", s->group_score[l * s->G + g]);
            st_strbuf_printf(&b, "]");
        }
        st_strbuf_printf(&b, "], \"channel_score\": [");
        for (int l = 0; l < s->L; l++) {
            st_strbuf_printf(&b, "%s[", l ? ", " : "");
            for (int j = 0; j < s->F; j++)
                st_strbuf_printf(&b, "%s%.9g", j ? ", " : "", s->chan_score[(size_t)l * s->F + j]);
            st_strbuf_printf(&b, "]");
        }
        st_strbuf_printf(&b, "]");
    }
    st_strbuf_printf(&b, ", \"kept_groups\": [");
    for (int l = 0; l < p->n_layer; l++) {
        st_strbuf_printf(&b, "%s", l ? ", " : "");
        json_array(&b, NULL, NULL, p->groups, p->group + (size_t)l * p->groups);
    }
    st_strbuf_printf(&b, "], \"kept_channels\": [");
    for (int l = 0; l < p->n_layer; l++) {
        st_strbuf_printf(&b, "%s", l ? ", " : "");
        json_array(&b, NULL, NULL, p->chans, p->chan + (size_t)l * p->chans);
    }
    st_strbuf_printf(&b, "]}\n");
    if (b.failed) { st_strbuf_free(&b); return st_fail(ST_ENOMEM, "out of memory"); }
    char path[4096];
    snprintf(path, sizeof path, "%s/compress_report.json", dir);
    int rc = st_write_file_atomic(path, b.data, b.len);
    st_strbuf_free(&b);
    return rc;
}

/* Tokenizer and generation files travel with the pruned model (the vocabulary does not change). */
static int copy_side_files(const char *from, const char *to) {
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                        "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char src[4096], dst[4096];
        snprintf(src, sizeof src, "%s/%s", from, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", to, files[i]);
        FILE *f = fopen(src, "rb");
        if (!f) continue;
        fclose(f);
        char *data;
        size_t len;
        int rc = st_read_file(src, &data, &len);
        if (!rc) rc = st_write_file_atomic(dst, data, len);
        if (!rc) free(data);
        if (rc) return rc;
    }
    return 0;
}

/* 0, -1 for a usage error, or the exit code of a malformed number (already printed). */
static int parse_args(int argc, char **argv, opts *o) {
    memset(o, 0, sizeof *o);
    o->T = 0, o->windows = 32, o->B = 4;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t n = 0;
        int rc = 0;
        if (!strcmp(a, "--force")) { o->force = 1; continue; }
        if (!v) return st_cli_bad_arg("compress", a), -1;
        if (!strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--out")) o->out = v;
        else if (!strcmp(a, "--drop-layers")) o->drop = v;
        else if (!strcmp(a, "--calib")) o->calib = v;
        else if (!strcmp(a, "--prune-heads")) rc = st_cli_real("compress", a, v, 0, 1, &o->heads);
        else if (!strcmp(a, "--prune-ffn")) rc = st_cli_real("compress", a, v, 0, 1, &o->ffn);
        else if (!strcmp(a, "--seq-len")) { if (!(rc = st_cli_int("compress", a, v, 1, 1 << 20, &n))) o->T = (int)n; }
        else if (!strcmp(a, "--calib-windows")) { if (!(rc = st_cli_int("compress", a, v, 1, 1 << 20, &n))) o->windows = (int)n; }
        else if (!strcmp(a, "--batch")) { if (!(rc = st_cli_int("compress", a, v, 1, 4096, &n))) o->B = (int)n; }
        else return st_cli_bad_arg("compress", a), -1;
        if (rc) return rc;
        i++;
    }
    if (!o->model || !o->out) return st_cli_missing("compress", !o->model ? "--model DIR" : "--out DIR"), -1;
    return 0;
}

static int plan_spec(const opts *o, const st_model *m, st_prune_spec *spec, unsigned char **mask) {
    memset(spec, 0, sizeof *spec);
    spec->prune_heads = o->heads;
    spec->prune_ffn = o->ffn;
    *mask = NULL;
    if (!o->drop) return 0;
    if (!strncmp(o->drop, "auto:", 5)) {
        char *end;
        long k = strtol(o->drop + 5, &end, 10);
        if (*end || k < 1) return st_fail(ST_EINVAL, "--drop-layers '%s': auto:K needs a positive K", o->drop);
        spec->drop_auto = (int)k;
        return 0;
    }
    if (!(*mask = calloc((size_t)m->cfg.n_layer, 1))) return st_fail(ST_ENOMEM, "out of memory");
    int rc = st_parse_layer_ranges(o->drop, m->cfg.n_layer, *mask);
    spec->drop_layer = *mask;
    return rc ? st_fail_context(rc, "--drop-layers") : 0;
}

static int run(const opts *o, double *before, double *after, st_model_config *out_cfg) {
    const st_backend *be = st_backend_cpu(0);
    st_model m, pm;
    st_dataset d;
    windows w = {0};
    st_prune_stats s = {0}, s2 = {0};
    st_prune_plan p = {0};
    st_prune_spec spec;
    unsigned char *mask = NULL;
    float *host = NULL;
    int rc = st_model_load_dir(o->model, be, &m), have_pm = 0, have_d = 0;
    if (rc) return rc;
    if ((rc = st_model_check_finite(&m, o->model))) { /* NaN weights: refused naming the tensor, as eval does */
        st_model_free(&m);
        return rc;
    }
    int T = o->T ? o->T : (m.cfg.max_seq < 128 ? m.cfg.max_seq : 128);
    *before = *after = -1;
    rc = plan_spec(o, &m, &spec, &mask);
    if (!rc && o->calib) {
        memset(&d, 0, sizeof d);
        have_d = (rc = st_dataset_load(o->calib, &d)) == 0;
        if (!rc) rc = make_windows(&d, T, o->windows, m.cfg.vocab, &w);
        if (!rc) rc = st_model_alloc_activations(&m, o->B, T);
        if (!rc) rc = st_prune_calibrate(&m, w.in, w.tg, w.w, w.n, 1, &s);
        if (!rc) *before = s.loss;
    }
    if (!rc) rc = st_prune_plan_make(&m.cfg, &spec, o->calib ? &s : NULL, &p);
    if (!rc && !(host = malloc(m.n_weights * sizeof(float)))) rc = st_fail(ST_ENOMEM, "out of memory");
    if (!rc) {
        be->copy_to_host(host, m.weights, m.n_weights * sizeof(float));
        have_pm = (rc = st_prune_apply(&m, host, &p, be, &pm)) == 0;
    }
    if (!rc && o->calib && !(rc = st_model_alloc_activations(&pm, o->B, T))) {
        if (!(rc = st_prune_calibrate(&pm, w.in, w.tg, w.w, w.n, 0, &s2))) *after = s2.loss;
    }
    if (!rc) rc = st_model_save_dir(&pm, o->out, 0);
    if (!rc) rc = copy_side_files(o->model, o->out);
    if (!rc) rc = write_report(o->out, o->calib ? &s : NULL, &p, *before, *after);
    if (!rc) *out_cfg = pm.cfg;
    if (have_pm) st_model_free(&pm);
    if (have_d) st_dataset_free(&d);
    st_prune_stats_free(&s);
    st_prune_stats_free(&s2);
    st_prune_plan_free(&p);
    free(w.in); free(w.tg); free(w.w);
    free(mask);
    free(host);
    st_model_free(&m);
    return rc;
}

int st_cmd_compress(int argc, char **argv) {
    opts o;
    int prc = parse_args(argc, argv, &o);
    if (prc < 0) return usage();
    if (prc) return prc;
    double before, after;
    st_model_config c = {0};
    const char *out = o.out;
    char tmp[4200]; /* written here, renamed to OUT when complete: no half-written OUT */
    int rc = st_cli_out_begin("compress", out, o.force, tmp, sizeof tmp);
    if (rc) return rc;
    o.out = tmp;
    if (run(&o, &before, &after, &c)) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", st_error());
        st_cli_out_end("compress", out, tmp, 0);
        return st_cli_error("compress", msg);
    }
    o.out = out;
    if ((rc = st_cli_out_end("compress", out, tmp, 1))) return rc;
    printf("compressed %s -> %s: %d layers, %d heads / %d kv heads, ffn %d", o.model, o.out, c.n_layer, c.n_head,
           c.n_kv_head, c.d_ff);
    if (before >= 0) printf("; calibration loss %.6f -> %.6f", before, after);
    printf("\n");
    return ST_EXIT_OK;
}
