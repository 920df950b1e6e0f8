/* cmd_data.c — `shardtune data pack (--jsonl IN.jsonl | --llmc-bin 'GLOB') --out DATA.h5 [--vocab V] [--eos ID]`.
 * Packs token data into the dataset file format (worker/dataset.h) and prints one summary line.
 * Exit 2 on a bad command line, 1 on any other failure; the output is written atomically, so a
 * failure never leaves a half-written DATA.h5 behind. */
#include "common/error.h"
#include "coordinator/commands.h"
#include "worker/dataset.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *st_data_usage =
    "usage: shardtune data pack (--jsonl IN.jsonl | --llmc-bin 'GLOB') --out DATA.h5 [--vocab V] [--eos ID]";

static int usage_error(const char *what, const char *arg) {
    fprintf(stderr, "shardtune data: error: %s%s%s\n%s\n", what, arg ? " " : "", arg ? arg : "", st_data_usage);
    return ST_EXIT_USAGE;
}

/* Parses a whole-string integer in [lo, hi]; returns 0 on success. */
static int parse_int(const char *s, long long lo, long long hi, long long *v) {
    char *end = NULL;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end || x < lo || x > hi) return -1;
    *v = x;
    return 0;
}

int st_cmd_data(int argc, char **argv) {
    if (argc < 2) return usage_error("missing subcommand", NULL);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        printf("%s\n", st_data_usage);
        return ST_EXIT_OK;
    }
    if (strcmp(argv[1], "pack") != 0) return usage_error("unknown subcommand", argv[1]);
    const char *jsonl = NULL, *llmc = NULL, *out = NULL;
    long long vocab = 0, eos = -1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int known = !strcmp(a, "--jsonl") || !strcmp(a, "--llmc-bin") || !strcmp(a, "--out") ||
                    !strcmp(a, "--vocab") || !strcmp(a, "--eos");
        if (!known) return usage_error("unknown argument", a);
        if (i + 1 >= argc) return usage_error("missing value after", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--jsonl")) jsonl = v;
        else if (!strcmp(a, "--llmc-bin")) llmc = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--vocab")) {
            if (parse_int(v, 1, 1LL << 32, &vocab) != 0) return usage_error("--vocab needs an integer in 1..2^32, got", v);
        } else if (parse_int(v, 0, 0xffffffffLL, &eos) != 0) {
            return usage_error("--eos needs a non-negative token id, got", v);
        }
    }
    if (!jsonl == !llmc) return usage_error("give exactly one of --jsonl or --llmc-bin", NULL);
    if (!out) return usage_error("missing --out DATA.h5", NULL);

    st_dataset ds;
    int rc = jsonl ? st_dataset_pack_jsonl(jsonl, vocab, eos, &ds) : st_dataset_pack_llmc(llmc, vocab, eos, &ds);
    if (rc < 0) return st_cli_error("data", st_error());
    rc = st_dataset_write(out, &ds);
    if (rc < 0) {
        st_dataset_free(&ds);
        return st_cli_error("data", st_error());
    }
    printf("packed docs=%llu tokens=%llu masked=%llu vocab=%lld eos=%lld -> %s\n", (unsigned long long)ds.n_docs,
           (unsigned long long)ds.n_tokens, (unsigned long long)st_dataset_masked_tokens(&ds), (long long)ds.vocab_size,
           (long long)ds.eos_id, out);
    st_dataset_free(&ds);
    return ST_EXIT_OK;
}
