/* cmd_init_model.c — `shardtune init-model`: a random-init HF-style model dir for demos and tests. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "checkpoints/model_io.h"
#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "worker/model.h"

static int usage(void) {
    fprintf(stderr, "usage: shardtune init-model --family llama|gpt2 --layers L --dim D --heads H [--kv-heads K]\n"
                    "         [--ffn F] --vocab V [--max-seq S] [--seed N] [--tied] [--qkv-bias] [--rope-theta X]\n"
                    "         --out DIR [--force]\n");
    return ST_EXIT_USAGE;
}

int st_cmd_init_model(int argc, char **argv) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    const char *family = NULL, *out = NULL;
    int64_t seed = 1234;
    int tied = -1, qkv_bias = 0, force = 0;
    c.max_seq = 1024;
    c.rope_theta = 10000.0f;
    c.bos_id = c.eos_id = -1;
    /* every number strictly, with a range (a typo is one line naming the flag, never a 0) */
    static const struct { const char *flag; int64_t lo, hi; } lim[] = {
        {"--layers", 1, 4096}, {"--dim", 1, 1 << 16}, {"--heads", 1, 1024}, {"--kv-heads", 1, 1024},
        {"--ffn", 1, 1 << 20}, {"--vocab", 2, 1 << 24}, {"--max-seq", 1, 1 << 22}, {"--seed", 0, INT64_MAX},
    };
    int *field[] = {&c.n_layer, &c.d_model, &c.n_head, &c.n_kv_head, &c.d_ff, &c.vocab, &c.max_seq, NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc, rc, matched = 0;
        for (size_t k = 0; k < sizeof lim / sizeof lim[0] && !matched; k++) {
            if (strcmp(a, lim[k].flag) != 0) continue;
            if (!has) { st_cli_bad_arg("init-model", a); return usage(); }
            int64_t v;
            if ((rc = st_cli_int("init-model", a, argv[++i], lim[k].lo, lim[k].hi, &v))) return rc;
            if (field[k]) *field[k] = (int)v;
            else seed = v;
            matched = 1;
        }
        if (matched) continue;
        if (!strcmp(a, "--family") && has) family = argv[++i];
        else if (!strcmp(a, "--rope-theta") && has) {
            double v;
            if ((rc = st_cli_real("init-model", a, argv[++i], 1e-6, 1e12, &v))) return rc;
            c.rope_theta = (float)v;
        }
        else if (!strcmp(a, "--out") && has) out = argv[++i];
        else if (!strcmp(a, "--tied")) tied = 1;
        else if (!strcmp(a, "--force")) force = 1;
        else if (!strcmp(a, "--qkv-bias")) qkv_bias = 1;
        else { st_cli_bad_arg("init-model", a); return usage(); }
    }
    if (!family || !out || c.n_layer < 1 || c.d_model < 1 || c.n_head < 1 || c.vocab < 2) {
        st_cli_missing("init-model", !family ? "--family llama|gpt2" : !out ? "--out DIR" : c.n_layer < 1 ? "--layers L"
                                     : c.d_model < 1 ? "--dim D" : c.n_head < 1 ? "--heads H" : "--vocab V");
        return usage();
    }
    if (!strcmp(family, "gpt2")) {
        c.family = ST_FAMILY_GPT2;
        snprintf(c.model_type, sizeof c.model_type, "gpt2");
        if (c.n_kv_head && c.n_kv_head != c.n_head) /* GPT-2 has one key/value head per query head */
            return st_cli_error("init-model", "--kv-heads: GPT-2 has no grouped-query attention (--kv-heads must equal "
                                              "--heads or be left out)");
        c.n_kv_head = c.n_head;
        if (!c.d_ff) c.d_ff = 4 * c.d_model;
        c.norm_eps = 1e-5f;
        c.tied_embeddings = tied != 0;
        c.qkv_bias = 1;
    } else if (!strcmp(family, "llama")) {
        c.family = ST_FAMILY_LLAMA;
        snprintf(c.model_type, sizeof c.model_type, "%s", qkv_bias ? "qwen2" : "llama");
        if (!c.n_kv_head) c.n_kv_head = c.n_head;
        if (!c.d_ff) c.d_ff = (8 * c.d_model / 3 + 31) / 32 * 32;
        c.norm_eps = 1e-5f;
        c.tied_embeddings = tied == 1;
        c.qkv_bias = qkv_bias;
    } else {
        fprintf(stderr, "shardtune init-model: error: --family must be llama or gpt2, got '%s'\n", family);
        return ST_EXIT_USAGE;
    }
    c.head_dim = c.n_head > 0 ? c.d_model / c.n_head : 0;
    if (c.head_dim * c.n_head != c.d_model)
        return st_cli_error("init-model", "--dim must be a multiple of --heads");
    char tmp[4200];
    int rc = st_cli_out_begin("init-model", out, force, tmp, sizeof tmp); /* written to tmp, then renamed */
    if (rc) return rc;
    st_model m;
    rc = st_model_build(&m, &c, st_backend_cpu(0));
    if (!rc) rc = st_model_init_random(&m, (uint64_t)seed);
    if (!rc) rc = st_model_save_dir(&m, tmp, 0);
    size_t n = m.n_weights;
    st_model_free(&m);
    if (rc) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", st_error());
        st_cli_out_end("init-model", out, tmp, 0);
        return st_cli_error("init-model", msg);
    }
    if ((rc = st_cli_out_end("init-model", out, tmp, 1))) return rc;
    printf("wrote %s: %s, %d layers, dim %d, heads %d/%d, ffn %d, vocab %d, %.2fM params\n", out, c.model_type,
           c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab, n / 1e6);
    return ST_EXIT_OK;
}
