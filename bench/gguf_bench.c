/* gguf_bench.c — GGUF export throughput (st_gguf_export: convert, encode, write, fsync, rename) vs the raw
 * sequential write bandwidth of the same directory measured in the same run (write + fsync of a file of
 * the same size, 1 MiB writes), per --quant type, interleaved export/raw rounds; medians over the rounds
 * (the machine is shared, so medians are steadier than means) and the load average before and after.
 * "ratio" = export MB/s / raw MB/s, both over the GGUF file's bytes (the target is >= 50%); "input ratio" the
 * same with the export's rate over the f32 input's bytes (what the quantized formats, whose files are 5-9x
 * smaller than their input, read and encode per second, against what the disk writes per second).
 * "export CPU s" / "raw CPU s": the process's CPU time (user + sys, all threads; medians) of the export and
 * of the raw write: what each costs in CPU, which a loaded machine cannot shrink, where wall time also
 * counts the other processes (the raw write mostly waits on the disk, the export mostly computes).
 * The encoders run on OMP_NUM_THREADS threads (rows in parallel), as `shardtune export` does.
 * --source dir: the export reads the model from a bf16 model directory (written once to DIR/src; its pages
 * stay in the page cache, as a model just trained or downloaded does), as `shardtune export MODEL_DIR --format
 * gguf` does, in the two ways alternated within each round: "streamed" (st_gguf_export_streamed: a tensor at
 * a time, the next one read and converted on a helper thread while the current one is encoded and written)
 * and "load+export" (the whole model read and converted first, then st_gguf_export from memory: what the CLI
 * did before); each row's time then counts reading and converting the source too.
 * usage: gguf_bench [--dir DIR] [--layers L] [--dim D] [--vocab V] [--reps R] [--quant a,b,...] [--source dir] */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoints/gguf.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "common/util.h"
#include "kernels/kernels.h"
#include "worker/model.h"

#include "bench/bench_io.h"

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + (double)u.ru_stime.tv_sec + 1e-6 * (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

typedef struct {
    st_safetensors *st;
} dir_src;

static int fetch_dir(void *ctx, const st_model *m, int i, float *dst) {
    return st_model_read_param(((dir_src *)ctx)->st, m, i, dst);
}

/* One export of the model in `src` (NULL: from m's weights) by `way` (0: from memory / load+export, 1:
 * streamed from the files). */
static int export_once(st_model *m, const char *src, int way, st_ggml_type t, const char *path, st_gguf_report *rep) {
    if (!src) return st_gguf_export(m, m->weights, t, NULL, path, rep);
    st_model d;
    int rc;
    if (way == 0) { /* read and convert everything, then export from memory */
        if ((rc = st_model_load_dir(src, st_backend_cpu(1), &d))) return rc;
        rc = st_gguf_export(&d, d.weights, t, NULL, path, rep);
    } else {
        dir_src ds = {NULL};
        if ((rc = st_model_open_dir(src, st_backend_cpu(1), &d))) return rc;
        rc = st_model_check_files(&d, src, &ds.st);
        if (!rc) rc = st_gguf_export_streamed(&d, fetch_dir, &ds, t, NULL, path, rep);
        st_safetensors_close(ds.st);
    }
    st_model_free(&d);
    return rc;
}

int main(int argc, char **argv) {
    const char *dir = "/tmp/st_gguf_bench", *quants = "f32,f16,bf16,q8_0,q4_0,q2_K,q3_K,q4_K,q5_K,q6_K,q4_K_M,q5_K_M";
    int L = 4, D = 1024, V = 32000, reps = 3, from_dir = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dir")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--layers")) L = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dim")) D = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--vocab")) V = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--quant")) quants = argv[i + 1];
        else if (!strcmp(argv[i], "--source")) from_dir = !strcmp(argv[i + 1], "dir");
    }
    if (reps < 1) reps = 1;
    st_model_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.family = ST_FAMILY_LLAMA;
    c.n_layer = L; c.d_model = D; c.n_head = 8; c.n_kv_head = 4; c.head_dim = D / 8; c.d_ff = D * 8 / 3 / 256 * 256;
    c.vocab = V; c.max_seq = 2048; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f; c.bos_id = -1; c.eos_id = -1;
    st_model m;
    if (st_model_build(&m, &c, st_backend_cpu(1)) || st_model_init_random(&m, 1)) {
        fprintf(stderr, "gguf_bench: %s\n", st_error());
        return 1;
    }
    st_mkdirs(dir);
    char la0[64], la1[64], path[1300], src[1300];
    snprintf(src, sizeof src, "%s/src", dir);
    if (from_dir) {
        snprintf(m.cfg.dtype, sizeof m.cfg.dtype, "bfloat16");
        if (st_model_save_dir(&m, src, 0)) {
            fprintf(stderr, "gguf_bench: %s\n", st_error());
            return 1;
        }
    }
    bench_loadavg(la0, sizeof la0);
    printf("gguf_bench: llama L%d D%d F%d V%d (%.1fM params, %.0f MB f32), %d rounds, dir %s, source %s, load average "
           "%s\n", L, D, c.d_ff, V, m.n_weights / 1e6, m.n_weights * 4 / 1e6, reps, dir,
           from_dir ? "bf16 model directory (rows: load+export, then streamed)" : "memory", la0);
    printf("| quant | file MB | export s (median) | export MB/s | raw write+fsync MB/s | ratio | input MB/s | input ratio "
           "| export CPU s | raw CPU s |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    char list[256];
    snprintf(list, sizeof list, "%s", quants);
    for (char *q = strtok(list, ","); q; q = strtok(NULL, ",")) {
        st_ggml_type t;
        if (st_ggml_type_parse(q, &t)) {
            fprintf(stderr, "gguf_bench: %s\n", st_error());
            return 1;
        }
        snprintf(path, sizeof path, "%s/bench.%s.gguf", dir, q);
        int ways = from_dir ? 2 : 1;
        double *ex = calloc((size_t)(2 * reps), sizeof(double)), *raw = calloc((size_t)reps, sizeof(double));
        double *exc = calloc((size_t)(2 * reps), sizeof(double)), *rawc = calloc((size_t)reps, sizeof(double));
        st_gguf_report rep;
        for (int r = 0; r < reps; r++) {
            for (int way = 0; way < ways; way++) {
                double t0 = st_now(), c0 = cpu_seconds();
                if (export_once(&m, from_dir ? src : NULL, way, t, path, &rep)) {
                    fprintf(stderr, "gguf_bench: %s\n", st_error());
                    return 1;
                }
                ex[way * reps + r] = st_now() - t0;
                exc[way * reps + r] = cpu_seconds() - c0;
                unlink(path);
            }
            double c0 = cpu_seconds();
            raw[r] = bench_raw_write(dir, rep.bytes);
            rawc[r] = cpu_seconds() - c0;
        }
        for (int way = 0; way < ways; way++) {
            double mb = rep.bytes / 1e6, e = bench_median(ex + way * reps, reps), w = bench_median(raw, reps);
            double in = m.n_weights * 4 / 1e6;
            char name[64];
            snprintf(name, sizeof name, "%s%s", q, !from_dir ? "" : way ? " streamed" : " load+export");
            printf("| %s | %.1f | %.3f | %.0f | %.0f | %.0f%% | %.0f | %.0f%% | %.3f | %.3f |\n", name, mb, e, mb / e,
                   mb / w, 100 * w / e, in / e, 100 * (in / e) / (mb / w), bench_median(exc + way * reps, reps),
                   bench_median(rawc, reps));
        }
        fflush(stdout);
        free(ex);
        free(raw);
        free(exc);
        free(rawc);
    }
    if (from_dir) st_remove_dir_files(src);
    bench_loadavg(la1, sizeof la1);
    printf("load average after: %s (2 cores, shared)\n", la1);
    st_model_free(&m);
    return 0;
}
