/* cmd_export.c — `shardtune export CKPT|MODEL_DIR --out DIR [--format hf|peft]`, `export SRC --merge --out DIR`: a
 * checkpoint's weights as an HF model directory (a LoRA run's checkpoint: merged into the base of its job, or
 * with --format peft its adapter directory; an adapter directory with --merge: merged into its base)
 * (model.safetensors + config.json). CKPT is a checkpoint file or directory (its `latest`). The
 * checkpoint carries the model's config.json (written back verbatim, weights in its dtype); the tokenizer,
 * chat template and generation files come from the source model directory of its job. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_dir.h"
#include "checkpoints/model_io.h"
#include "checkpoints/peft_dir.h"
#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/json.h"
#include "coordinator/cli/commands.h"
#include "coordinator/config/config.h"
#include "coordinator/trainer/plan.h"
#include "kernels/kernels.h"
#include "common/util.h"
#include "worker/lora.h"
#include "worker/qlora.h"

/* The source model directory a checkpoint's job trained (model.path of its job spec), or "" . */
static void job_model_path(const char *job_spec, char *out, size_t cap) {
    st_json *j = NULL;
    out[0] = 0;
    if (!job_spec || st_json_parse(job_spec, strlen(job_spec), &j)) return;
    const char *p = st_json_get_string(st_json_get(j, "model"), "path", "");
    snprintf(out, cap, "%s", p ? p : "");
    st_json_free(j);
}

/* A LoRA run's checkpoint (adapters + base checksum): the base from its job's model.path, the adapters
 * attached as the job did, then the adapter directory (peft) or the merged model (hf). */
static int export_lora_ckpt(const char *path, const st_ckpt_info *info, const st_config *job, const char *out,
                            int peft) {
    st_model m;
    const char *src = job->model.path;
    int rc = st_model_load_dir(src, st_backend_cpu(0), &m);
    if (rc) return st_fail_context(rc, "checkpoint %s: its base model (model.path) %s", path, src);
    float *host = NULL;
    if (!(rc = st_plan_attach_adapters(job, &m))) {
        host = malloc(m.n_weights * sizeof(float));
        rc = host ? st_ckpt_load_model(path, &m, host) : st_fail(ST_ENOMEM, "out of memory");
    }
    if (!rc) {
        m.be->copy_to_device(m.weights, host, m.n_weights * sizeof(float));
        if (peft) rc = st_peft_save_dir(&m, out, src);
        else if (!(rc = st_qlora_materialize(&m)) && !(rc = st_lora_merge(&m))) /* QLoRA: onto the dequantized base */
            rc = st_model_export_dir(&m, out, src, info->model_config, 0);
    }
    free(host);
    st_model_free(&m);
    return rc;
}

int st_export_fetch_ckpt(void *ctx, const st_model *m, int i, float *dst) {
    return dst ? st_ckpt_load_param(ctx, m, i, dst) : 0;
}

int st_export_fetch_model_dir(void *ctx, const st_model *m, int i, float *dst) {
    const st_export_dir_src *src = ctx;
    if (!dst) return 0;
    const st_param *p = &m->params[i];
    /* NaN/Inf weights: refused naming the tensor, as eval and train do (a checkpoint's are verified on save);
     * read in pieces, each checked while it is still in cache (a second pass over a large tensor costs as
     * much as q4_0's encoder); a transposed GPT-2 Conv1D tensor is read whole */
    if (p->ndim == 2 && p->transpose_io) {
        int rc = st_model_read_param(src->st, m, i, dst);
        return rc ? rc : st_check_finite_values(dst, p->numel, 0, src->dir, p->name);
    }
    enum { PIECE = 1 << 16 };
    for (size_t a = 0; a < p->numel; a += PIECE) {
        size_t n = p->numel - a < PIECE ? p->numel - a : PIECE;
        int rc = st_model_read_param_range(src->st, m, i, a, n, dst + a);
        if (!rc) rc = st_check_finite_values(dst + a, n, a, src->dir, p->name);
        if (rc) return rc;
    }
    return 0;
}

static int export_ckpt(const char *path, const char *out, int peft) {
    st_ckpt_info info;
    int rc = st_ckpt_read_info(path, &info);
    if (rc) return rc;
    st_config *job = calloc(1, sizeof *job);
    if (!job) { st_ckpt_info_free(&info); return st_fail(ST_ENOMEM, "out of memory"); }
    int lora = info.job_spec && !st_config_load_string(job, info.job_spec, 0, NULL) &&
               (job->finetune.mode == ST_FINETUNE_LORA || job->finetune.mode == ST_FINETUNE_QLORA ||
                st_config_prompt_learning(job)); /* any PEFT mode: its adapters */
    if (lora || peft) {
        rc = lora ? export_lora_ckpt(path, &info, job, out, peft)
                  : st_fail(ST_EINVAL, "checkpoint %s is not from a finetune.mode lora run: --format peft needs adapters", path);
        free(job);
        st_ckpt_info_free(&info);
        return rc;
    }
    free(job);
    st_model_config mc;
    char src[4096];
    rc = st_model_config_parse(info.model_config, strlen(info.model_config), path, &mc);
    job_model_path(info.job_spec, src, sizeof src);
    if (rc) { st_ckpt_info_free(&info); return rc; }
    st_model m;
    const st_backend *be = st_backend_cpu(1);
    if ((rc = st_model_build(&m, &mc, be)) != 0) { st_ckpt_info_free(&info); return rc; }
    /* streamed: a tensor at a time from the checkpoint (shapes and checksums verified) to the files, so the
     * export never holds the model (the built model's weights stay untouched, hence not resident); the
     * checkpoint's own config.json text; tokenizer and generation files from the source model directory
     * when it is still there (a moved source only loses those extras) */
    rc = st_model_export_dir_streamed(&m, out, access(src, F_OK) == 0 ? src : NULL, info.model_config, 0,
                                      st_export_fetch_ckpt, (void *)path);
    st_model_free(&m);
    st_ckpt_info_free(&info);
    return rc;
}

/* export ADAPTER_DIR --merge --out DIR [--model BASE]: the base model (adapter_config.json's
 * base_model_name_or_path unless --model) with the LoRA adapter folded into its weights. */
static int export_merged(const char *adapter, const char *base, const char *out) {
    char path[4200], base_path[4096];
    char *text = NULL, *base_cfg = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/adapter_config.json", adapter);
    int rc = st_read_file(path, &text, &len);
    if (rc) return st_fail(rc, "export --merge: %s is not a PEFT adapter directory (%s)", adapter, st_error());
    st_json *j = NULL;
    if ((rc = st_json_parse(text, len, &j))) { free(text); return st_fail_context(rc, "%s", path); }
    free(text);
    const char *named = st_json_get_string(j, "base_model_name_or_path", NULL);
    snprintf(base_path, sizeof base_path, "%s", base ? base : named ? named : "");
    st_json_free(j);
    if (!base_path[0]) return st_fail(ST_EINVAL, "export --merge: %s names no base model: pass --model DIR", path);
    st_model m;
    if ((rc = st_model_load_dir(base_path, st_backend_cpu(0), &m))) return st_fail_context(rc, "base model %s", base_path);
    rc = st_peft_load_dir(&m, adapter);
    if (!rc) rc = st_lora_merge(&m);
    snprintf(path, sizeof path, "%s/config.json", base_path);
    if (!rc && (rc = st_read_file(path, &base_cfg, &len))) rc = st_fail(rc, "%s: %s", path, st_error());
    if (!rc) rc = st_model_export_dir(&m, out, base_path, base_cfg, 0);
    free(base_cfg);
    st_model_free(&m);
    return rc;
}

/* export MODEL_DIR --out DIR: a model directory re-written as shardtune writes final/ (its own config.json
 * text, weights in its dtype, the tokenizer and generation files carried along). */
static int export_model_dir(const char *src, const char *out) {
    char path[4200], *cfg = NULL;
    size_t len = 0;
    st_model m;
    /* streamed: the model is built (weights untouched, not resident) and each tensor goes from the source
     * files to the new ones on its own */
    int rc = st_model_open_dir(src, st_backend_cpu(0), &m);
    if (rc) return rc;
    st_safetensors *st = NULL;
    snprintf(path, sizeof path, "%s/config.json", src);
    if ((rc = st_read_file(path, &cfg, &len))) rc = st_fail(rc, "%s: %s", path, st_error());
    if (!rc) rc = st_model_check_files(&m, src, &st);
    st_export_dir_src from = {NULL, src};
    if (!rc) from.st = st, rc = st_model_export_dir_streamed(&m, out, src, cfg, 0, st_export_fetch_model_dir, &from);
    st_safetensors_close(st);
    free(cfg);
    st_model_free(&m);
    return rc;
}

/* A failed export: the one error line, and no half-written OUT left behind (the export went to the temporary
 * sibling `tmp`, removed here; OUT is left as it was). */
static int export_failed(const char *out, const char *tmp) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", st_error());
    st_cli_out_end("export", out, tmp, 0);
    return st_cli_error("export", msg);
}

/* --force anywhere on the command line (replace an existing non-empty OUT). */
static int has_force(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--force")) return 1;
    return 0;
}

int st_cmd_export(int argc, char **argv) {
    const char *src_arg = NULL, *out_dir_arg = NULL;
    int merge = 0, force = has_force(argc, argv), rc;
    const char *base = NULL;
    char tmp[4200];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--merge")) merge = 1;
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) base = argv[i + 1];
    }
    if (merge) {
        for (int i = 1; i < argc; i++) {
            if (!strcmp(argv[i], "--merge") || !strcmp(argv[i], "--force")) continue;
            if ((!strcmp(argv[i], "--out") || !strcmp(argv[i], "--model")) && i + 1 < argc) {
                if (!strcmp(argv[i], "--out")) out_dir_arg = argv[i + 1];
                i++;
            } else if (argv[i][0] != '-' && !src_arg) src_arg = argv[i];
            else { st_cli_bad_arg("export", argv[i]); src_arg = out_dir_arg = NULL; break; }
        }
        if (!src_arg || !out_dir_arg) {
            if (src_arg || out_dir_arg) st_cli_missing("export", !src_arg ? "SRC" : "--out DIR");
            fprintf(stderr, "usage: shardtune export ADAPTER_DIR --merge --out DIR [--model BASE_DIR] [--force]\n");
            return ST_EXIT_USAGE;
        }
        char probe[4200], path[2048];
        if ((rc = st_cli_out_begin("export", out_dir_arg, force, tmp, sizeof tmp))) return rc;
        snprintf(probe, sizeof probe, "%s/adapter_config.json", src_arg);
        if (access(probe, F_OK) == 0 ? export_merged(src_arg, base, tmp)
                                     : st_ckpt_resolve(src_arg, path, sizeof path) || export_ckpt(path, tmp, 0))
            return export_failed(out_dir_arg, tmp);
        if ((rc = st_cli_out_end("export", out_dir_arg, tmp, 1))) return rc;
        printf("exported %s merged into its base -> %s\n", src_arg, out_dir_arg);
        return ST_EXIT_OK;
    }
    const char *ckpt = NULL, *out = NULL, *format = "hf";
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--format") && i + 1 < argc) format = argv[i + 1];
    if (!strcmp(format, "gguf")) {
        for (int i = 1; i < argc; i++) {
            if ((!strcmp(argv[i], "--out") || !strcmp(argv[i], "--format") || !strcmp(argv[i], "--quant") ||
                 !strcmp(argv[i], "--tokenizer") || !strcmp(argv[i], "--name") ||
                 !strcmp(argv[i], "--tokenizer-pre") || !strcmp(argv[i], "--model")) && i + 1 < argc) {
                if (!strcmp(argv[i], "--out")) out = argv[i + 1];
                i++;
            } else if (argv[i][0] != '-' && !ckpt) ckpt = argv[i];
        }
        if (!ckpt || !out) {
            st_cli_missing("export", !ckpt ? "SRC" : "--out FILE.gguf");
            fprintf(stderr, "usage: shardtune export SRC --out FILE.gguf --format gguf [--quant f32|f16|bf16|q8_0|q4_0|q2_K|q3_K|q4_K|q5_K|q6_K|q4_K_M|q5_K_M]"
                            " [--tokenizer DIR | --no-tokenizer] [--tokenizer-pre NAME] [--name NAME] [--model BASE_DIR]\n");
            return ST_EXIT_USAGE;
        }
        if ((rc = st_cli_out_begin("export", out, force, tmp, sizeof tmp))) return rc;
        rc = st_export_gguf(ckpt, tmp, out, argc, argv);
        if (rc) { st_cli_out_end("export", out, tmp, 0); return rc; }
        return st_cli_out_end("export", out, tmp, 1);
    }
    if (strcmp(format, "hf") != 0 && strcmp(format, "peft") != 0) {
        fprintf(stderr, "shardtune export: error: --format '%s' is not supported (hf, peft or gguf)\n", format);
        return ST_EXIT_USAGE;
    }
    int peft = !strcmp(format, "peft");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--force")) continue;
        else if (!strcmp(argv[i], "--format") && i + 1 < argc && (!strcmp(argv[i + 1], "hf") || peft)) i++;
        else if (argv[i][0] != '-' && !ckpt) ckpt = argv[i];
        else {
            if (!strcmp(argv[i], "--quant") || !strcmp(argv[i], "--tokenizer") || !strcmp(argv[i], "--tokenizer-pre"))
                fprintf(stderr, "shardtune export: error: %s goes with --format gguf\n", argv[i]);
            else st_cli_bad_arg("export", argv[i]);
            ckpt = out = NULL;
            break;
        }
    }
    if (!ckpt || !out) {
        if (ckpt || out || argc < 2) st_cli_missing("export", !ckpt ? "SRC" : "--out DIR");
        fprintf(stderr, "usage: shardtune export SRC --out DST [--format hf|peft|gguf] [--merge] [--quant TYPE] [--force]\n");
        return ST_EXIT_USAGE;
    }
    char path[2048];
    snprintf(path, sizeof path, "%s/config.json", ckpt);
    int model_dir = !peft && access(path, F_OK) == 0; /* SRC is a model directory */
    snprintf(path, sizeof path, "%s/adapter_config.json", ckpt);
    if (!model_dir && access(path, F_OK) == 0) { /* a PEFT adapter directory: hf needs the base, peft is what it already is */
        fprintf(stderr, "shardtune export: error: %s is a PEFT adapter directory: pass --merge to write the base model "
                        "with the adapter folded in (or --format gguf for a GGUF LoRA adapter)\n", ckpt);
        return ST_EXIT_USAGE;
    }
    if ((rc = st_cli_out_begin("export", out, force, tmp, sizeof tmp))) return rc;
    if (model_dir) {
        if (export_model_dir(ckpt, tmp)) return export_failed(out, tmp);
        if ((rc = st_cli_out_end("export", out, tmp, 1))) return rc;
        printf("exported %s -> %s (model.safetensors + config.json + the source's tokenizer/generation files)\n", ckpt,
               out);
        return ST_EXIT_OK;
    }
    if (st_ckpt_resolve(ckpt, path, sizeof path) || export_ckpt(path, tmp, peft)) return export_failed(out, tmp);
    if ((rc = st_cli_out_end("export", out, tmp, 1))) return rc;
    if (peft) printf("exported %s -> %s (adapter_config.json + adapter_model.safetensors)\n", path, out);
    else printf("exported %s -> %s (model.safetensors + config.json + the source's tokenizer/generation files)\n", path,
                out);
    return ST_EXIT_OK;
}
