/* main.c — `shardtune` entry point: dispatches to a subcommand (coordinator/cli/commands.h). */
#include "coordinator/cli/commands.h"

#include <malloc.h>
#include <stdio.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/cpu/cpu_kernels.h"

struct st_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *usage;
};

static const struct st_command st_commands[] = {
    {"init-model", st_cmd_init_model,
     "--family llama|gpt2 --layers L --dim D --heads H [--kv-heads K] [--ffn F] --vocab V [--max-seq S] [--seed N] --out DIR [--force]"},
    {"data", st_cmd_data, "pack (--jsonl IN.jsonl | --llmc-bin 'GLOB' | --text IN.jsonl --model DIR) --out DATA.h5 [--force] ..."},
    {"tokenize", st_cmd_tokenize, "--model DIR [--decode] [--no-special]   (stdin -> stdout, one JSON value a line)"},
    {"train", st_cmd_train, "JOB.yaml [dotted.key=value ...]"},
    {"eval", st_cmd_eval, "--model DIR [--adapter DIR] --data DATA.h5 --seq-len T [--json]"},
    {"plan", st_cmd_plan, "JOB.yaml --ranks N [--json]"},
    {"ckpt", st_cmd_ckpt, "inspect|verify PATH"},
    {"export", st_cmd_export, "SRC --out DST [--format hf|peft|gguf] [--merge] [--quant f32|f16|bf16|q8_0|q4_0|q2_K|q3_K|q4_K|q5_K|q6_K|q4_K_M|q5_K_M] [--force]"},
    {"compress", st_cmd_compress, "--model DIR --out DIR [--drop-layers SPEC] [--prune-heads F] [--prune-ffn F] "
                                  "[--calib DATA.h5] [--force]"},
    {"monitor", st_cmd_monitor, "[ADDR] [--run-dir DIR] [--plain|--json]"},
    {"ctl", st_cmd_ctl, "[ADDR] status|checkpoint|stop|pause|resume [--run-dir DIR | --token-file F]"},
    {"plot", st_cmd_plot, "RUN_DIR --out FILE.svg|FILE.png [--force]"},
    {"generate", st_cmd_generate,
     "--model DIR [--adapter DIR] --prompts IN.jsonl --out OUT.jsonl [--max-new N] [--temperature T] [--top-p P] "
     "[--top-k K] [--seed S] [--chat] [--force]"},
    {"compare", st_cmd_compare,
     "sheet --base DIR --tuned DIR [--adapter DIR] --prompts IN.jsonl --out DIR [--max-new N] | score DIR --votes VOTES.jsonl "
     "[--json] | judge DIR --judge MODEL_DIR [--json]"},
};
#define ST_NCOMMANDS (sizeof st_commands / sizeof st_commands[0])

static void usage(FILE *out) {
    fprintf(out, "usage: shardtune <command> [args]\n\ncommands:\n");
    for (size_t i = 0; i < ST_NCOMMANDS; i++)
        fprintf(out, "  %-11s %s\n", st_commands[i].name, st_commands[i].usage);
}

/* glibc raises its mmap threshold to the size of each freed mmapped block (up to 32 MiB), after which freed
 * large scratch (oneDNN's per-call sgemm packing buffers of 1-16 MiB, the per-layer gather buffers) stays in
 * the heap: 8-16 MiB of resident memory no one uses on a 76-135 MiB plan (test_dp_memory), so `shardtune
 * plan` could not be held to the RSS. A fixed threshold (glibc's own initial 128 KiB; fixing it also fixes
 * the trim threshold) gives large blocks back to the system on free: RSS is live memory, within +0.5..+0.8%
 * of the plan there. The cost, a fresh mapping per sgemm call, measured within noise in bench/step_matmuls
 * (2026-12-06, bench/README.md). */
static void fixed_mmap_threshold(void) { mallopt(M_MMAP_THRESHOLD, 128 * 1024); }

int main(int argc, char **argv) {
    fixed_mmap_threshold();
    if (argc < 2) {
        usage(stderr);
        return ST_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return ST_EXIT_OK;
    }
    if (st_cpu_sgemm_check() != 0) {
        fprintf(stderr, "shardtune: error: %s\n", st_error());
        return ST_EXIT_USAGE;
    }
    for (size_t i = 0; i < ST_NCOMMANDS; i++) {
        if (strcmp(argv[1], st_commands[i].name) != 0) continue;
        return st_commands[i].run(argc - 1, argv + 1);
    }
    fprintf(stderr, "shardtune: error: unknown command '%s' (run 'shardtune --help')\n", argv[1]);
    return ST_EXIT_USAGE;
}
