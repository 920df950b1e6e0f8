/* cmd_export.c — `shardtune export CKPT --out DIR`: a checkpoint's weights as an HF model directory
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
#include "common/error.h"
#include "common/json.h"
#include "coordinator/commands.h"
#include "kernels/kernels.h"

/* The source model directory a checkpoint's job trained (model.path of its job spec), or "" . */
static void job_model_path(const char *job_spec, char *out, size_t cap) {
    st_json *j = NULL;
    out[0] = 0;
    if (!job_spec || st_json_parse(job_spec, strlen(job_spec), &j)) return;
    const char *p = st_json_get_string(st_json_get(j, "model"), "path", "");
    snprintf(out, cap, "%s", p ? p : "");
    st_json_free(j);
}

static int export_ckpt(const char *path, const char *out) {
    st_ckpt_info info;
    int rc = st_ckpt_read_info(path, &info);
    if (rc) return rc;
    st_model_config mc;
    char src[4096];
    rc = st_model_config_parse(info.model_config, strlen(info.model_config), path, &mc);
    job_model_path(info.job_spec, src, sizeof src);
    if (rc) { st_ckpt_info_free(&info); return rc; }
    st_model m;
    const st_backend *be = st_backend_cpu(1);
    if ((rc = st_model_build(&m, &mc, be)) != 0) { st_ckpt_info_free(&info); return rc; }
    float *host = malloc(m.n_weights * sizeof(float));
    if (!host) rc = st_fail(ST_ENOMEM, "out of memory");
    if (!rc) rc = st_ckpt_load_model(path, &m, host); /* shapes and checksums verified */
    if (!rc) {
        be->copy_to_device(m.weights, host, m.n_weights * sizeof(float));
        /* the checkpoint's own config.json text; tokenizer and generation files from the source model
         * directory when it is still there (a moved source only loses those extras) */
        rc = st_model_export_dir(&m, out, access(src, F_OK) == 0 ? src : NULL, info.model_config, 0);
    }
    free(host);
    st_model_free(&m);
    st_ckpt_info_free(&info);
    return rc;
}

int st_cmd_export(int argc, char **argv) {
    const char *ckpt = NULL, *out = NULL, *format = "hf";
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--format") && i + 1 < argc) format = argv[i + 1];
    if (!strcmp(format, "gguf")) {
        for (int i = 1; i < argc; i++) {
            if ((!strcmp(argv[i], "--out") || !strcmp(argv[i], "--format") || !strcmp(argv[i], "--quant") ||
                 !strcmp(argv[i], "--tokenizer") || !strcmp(argv[i], "--name")) && i + 1 < argc) {
                if (!strcmp(argv[i], "--out")) out = argv[i + 1];
                i++;
            } else if (argv[i][0] != '-' && !ckpt) ckpt = argv[i];
        }
        if (!ckpt || !out) {
            fprintf(stderr, "usage: shardtune export SRC --out FILE.gguf --format gguf [--quant f32|f16|bf16|q8_0|q4_0]"
                            " [--tokenizer DIR | --no-tokenizer] [--name NAME]\n");
            return ST_EXIT_USAGE;
        }
        return st_export_gguf(ckpt, out, argc, argv);
    }
    if (strcmp(format, "hf") != 0) {
        fprintf(stderr, "shardtune export: error: --format '%s' is not supported (hf or gguf)\n", format);
        return ST_EXIT_USAGE;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--format") && i + 1 < argc && !strcmp(argv[i + 1], "hf")) i++;
        else if (argv[i][0] != '-' && !ckpt) ckpt = argv[i];
        else ckpt = NULL, i = argc;
    }
    if (!ckpt || !out) {
        fprintf(stderr, "usage: shardtune export CKPT --out DIR\n");
        return ST_EXIT_USAGE;
    }
    char path[2048];
    if (st_ckpt_resolve(ckpt, path, sizeof path) || export_ckpt(path, out)) return st_cli_error("export", st_error());
    printf("exported %s -> %s (model.safetensors + config.json + the source's tokenizer/generation files)\n", path,
           out);
    return ST_EXIT_OK;
}
