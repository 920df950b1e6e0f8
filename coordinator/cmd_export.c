/* cmd_export.c — `shardtune export CKPT --out DIR`: a checkpoint's weights as an HF model directory
 * (model.safetensors + config.json). CKPT is a checkpoint file or directory (its `latest`). The
 * checkpoint carries the model's config.json, so nothing else is needed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_dir.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "coordinator/commands.h"
#include "kernels/kernels.h"

static int export_ckpt(const char *path, const char *out) {
    st_ckpt_info info;
    int rc = st_ckpt_read_info(path, &info);
    if (rc) return rc;
    st_model_config mc;
    rc = st_model_config_parse(info.model_config, strlen(info.model_config), path, &mc);
    st_ckpt_info_free(&info);
    if (rc) return rc;
    st_model m;
    const st_backend *be = st_backend_cpu(1);
    if ((rc = st_model_build(&m, &mc, be)) != 0) return rc;
    float *host = malloc(m.n_weights * sizeof(float));
    if (!host) rc = st_fail(ST_ENOMEM, "out of memory");
    if (!rc) rc = st_ckpt_load_model(path, &m, host); /* shapes and checksums verified */
    if (!rc) {
        be->copy_to_device(m.weights, host, m.n_weights * sizeof(float));
        rc = st_model_save_dir(&m, out, 0);
    }
    free(host);
    st_model_free(&m);
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
    printf("exported %s -> %s (model.safetensors + config.json)\n", path, out);
    return ST_EXIT_OK;
}
