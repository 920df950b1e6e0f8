/* cmd_ckpt.c — `shardtune ckpt inspect PATH` and `shardtune ckpt verify PATH`.
 *
 * PATH is a checkpoint file or a checkpoint directory (its `latest`). inspect prints the root
 * attributes and one row per tensor (shape, stored bytes); verify reads every dataset back (HDF5
 * checks Fletcher32 in files written before 2026-12-06) and recomputes its checksum attribute, and
 * prints "ok: N tensors" or one line naming the first bad tensor (exit 1). Format: docs/checkpoint-format.md. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "common/error.h"
#include "coordinator/cli/commands.h"

static int usage(void) {
    fprintf(stderr, "usage: shardtune ckpt inspect|verify PATH\n");
    return ST_EXIT_USAGE;
}

typedef struct {
    int n;
    uint64_t bytes, elems;
} totals;

static void print_tensor(void *ctx, const char *name, int ndim, const uint64_t *dims, uint64_t stored) {
    totals *t = ctx;
    char shape[64];
    if (ndim == 2) snprintf(shape, sizeof shape, "[%llu, %llu]", (unsigned long long)dims[0], (unsigned long long)dims[1]);
    else snprintf(shape, sizeof shape, "[%llu]", (unsigned long long)dims[0]);
    printf("  %-60s %-16s %12llu bytes\n", name, shape, (unsigned long long)stored);
    t->n++;
    t->bytes += stored;
    t->elems += ndim == 2 ? dims[0] * dims[1] : dims[0];
}

static int inspect(const char *path) {
    st_ckpt_info info;
    int rc = st_ckpt_read_info(path, &info);
    if (rc) return st_cli_error("ckpt", st_error());
    printf("checkpoint  %s\n", path);
    printf("format      %s v%d\n", ST_CKPT_FORMAT, info.version);
    printf("step        %lld\n", (long long)info.step);
    printf("tokens_seen %llu\n", (unsigned long long)info.tokens_seen);
    printf("stage       %d\n", info.stage);
    printf("world_size  %d\n", info.world_size);
    if (isnan(info.last_loss)) printf("last_loss   none\n");
    else printf("last_loss   %.6f\n", info.last_loss);
    printf("loader      %zu state words\n", info.loader_words);
    for (int k = 0; k < info.n_tasks; k++)
        printf("task        %s (dataset checksum %016llx)\n", info.task_names[k], (unsigned long long)info.task_checksums[k]);
    printf("job_spec    %zu bytes, model_config %zu bytes\n", strlen(info.job_spec), strlen(info.model_config));
    st_ckpt_info_free(&info);
    totals t = {0};
    printf("tensors:\n");
    rc = st_ckpt_list_tensors(path, print_tensor, &t);
    if (rc) return st_cli_error("ckpt", st_error());
    printf("%d tensors, %llu elements, %.2f MB stored\n", t.n, (unsigned long long)t.elems, t.bytes / 1e6);
    return ST_EXIT_OK;
}

static int verify(const char *path) {
    int n = 0;
    int rc = st_ckpt_verify(path, &n);
    if (rc) return st_cli_error("ckpt", st_error());
    printf("ok: %d tensors\n", n);
    return ST_EXIT_OK;
}

int st_cmd_ckpt(int argc, char **argv) {
    if (argc != 3) {
        if (argc > 3) st_cli_bad_arg("ckpt", argv[3]);
        else st_cli_missing("ckpt", argc < 2 ? "inspect|verify" : "PATH");
        return usage();
    }
    if (strcmp(argv[1], "inspect") != 0 && strcmp(argv[1], "verify") != 0) {
        fprintf(stderr, "shardtune ckpt: error: unknown subcommand '%s' (inspect or verify)\n", argv[1]);
        return usage();
    }
    char path[2048];
    if (st_ckpt_resolve(argv[2], path, sizeof path)) return st_cli_error("ckpt", st_error());
    if (!strcmp(argv[1], "inspect")) return inspect(path);
    if (!strcmp(argv[1], "verify")) return verify(path);
    return usage();
}
