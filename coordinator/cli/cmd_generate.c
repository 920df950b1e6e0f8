/* cmd_generate.c — `shardtune generate --model DIR --prompts IN.jsonl --out OUT.jsonl [options]`.
 *
 * Contract (DESIGN.md, docs/generate.md): each input line is a JSON object with "input_ids" (or text
 * "prompt" / "messages" when the build has tokenizer support); each output line is the input object with
 * ("output" and) "output_ids" and "finish_reason" added, in input order, whatever the number of ranks.
 * The work is in gen_run.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/cli/commands.h"
#include "coordinator/generate/gen_run.h"
#include "coordinator/generate/gen_text.h"

/* ---------------- the command ---------------- */

static int usage(void) {
    fprintf(stderr, "usage: shardtune generate --model DIR [--adapter DIR] --prompts IN.jsonl --out OUT.jsonl "
                    "[--max-new N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--chat]\n"
                    "                          [--repetition-penalty R] [--stop STR] [--batch B] "
                    "[--backend auto|cpu|cuda] [--timing] [--force]\n"
                    "(an existing non-empty OUT.jsonl is refused unless --force; the file is written aside, then renamed)\n");
    return ST_EXIT_USAGE;
}

/* The output file: each input object with output_ids and finish_reason appended. */
static int write_outputs(const char *path, const st_prompt_set *ps, const st_answer *ans) {
    st_strbuf b = {0};
    for (int i = 0; i < ps->n; i++) {
        const char *line = ps->p[i].line;
        size_t len = strlen(line);
        while (len > 0 && line[len - 1] != '}') len--; /* the object's closing brace */
        size_t body = len - 1;
        while (body > 0 && (line[body - 1] == ' ' || line[body - 1] == '\t')) body--;
        st_strbuf_append(&b, line, body);
        if (ans[i].text) {
            st_strbuf_printf(&b, "%s\"output\": ", line[body - 1] == '{' ? "" : ", ");
            st_strbuf_json_string(&b, ans[i].text);
            st_strbuf_printf(&b, ", \"output_ids\": [");
        } else {
            st_strbuf_printf(&b, "%s\"output_ids\": [", line[body - 1] == '{' ? "" : ", ");
        }
        for (int k = 0; k < ans[i].n; k++) st_strbuf_printf(&b, "%s%d", k ? ", " : "", ans[i].ids[k]);
        st_strbuf_printf(&b, "], \"finish_reason\": \"%s\"}\n", st_gen_finish_name(ans[i].finish));
    }
    if (b.failed) { st_strbuf_free(&b); return st_fail(ST_ENOMEM, "out of memory writing %s", path); }
    int rc = st_write_file_atomic(path, b.data ? b.data : "", b.len);
    st_strbuf_free(&b);
    return rc;
}

static int write_dump(const char *path, const float *d, const st_answer *ans, int n, int vocab) {
    size_t floats = 0;
    for (int i = 0; i < n; i++) floats += (size_t)ans[i].n * vocab;
    return st_write_file_atomic(path, d, floats * sizeof(float));
}

int st_cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompts = NULL, *out = NULL, *adapter = NULL, *dump_path = NULL;
    st_gen_flags f;
    int force = 0;
    st_gen_flags_default(&f);
    for (int i = 1; i < argc; i++) {
        int has = i + 1 < argc, c = st_gen_flags_parse(&f, argc, argv, &i);
        if (c < 0) { fprintf(stderr, "shardtune generate: error: %s\n", st_error()); return usage(); }
        if (c) continue;
        if (!strcmp(argv[i], "--model") && has) model = argv[++i];
        else if (!strcmp(argv[i], "--prompts") && has) prompts = argv[++i];
        else if (!strcmp(argv[i], "--out") && has) out = argv[++i];
        else if (!strcmp(argv[i], "--adapter") && has) adapter = argv[++i];
        else if (!strcmp(argv[i], "--force")) force = 1;
        else if (!strcmp(argv[i], "--dump-logits") && has) dump_path = argv[++i]; /* tests: raw fp32 logits */
        else { st_cli_bad_arg("generate", argv[i]); return usage(); }
    }
    if (!model || !prompts || !out) {
        st_cli_missing("generate", !model ? "--model DIR" : !prompts ? "--prompts IN.jsonl" : "--out OUT.jsonl");
        return usage();
    }
    int provided = 0, rank = 0, world = 1;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    int rc = 0, print_error = 0;
    st_prompt_set ps = {0};
    char tmp[4200]; /* OUT is written here, renamed when complete */
    int refused = rank == 0 ? st_cli_out_begin("generate", out, force, tmp, sizeof tmp) : 0;
    MPI_Bcast(&refused, 1, MPI_INT, 0, MPI_COMM_WORLD); /* rank 0 printed the reason */
    if (refused) {
        MPI_Finalize();
        return refused;
    }
    f.adapter = adapter;
    if (dump_path && world > 1) rc = st_fail(ST_EINVAL, "--dump-logits runs on one rank only");
    if (!rc) rc = st_prompts_read(prompts, &ps);
    if (rc) { /* every rank read the same input and reached the same verdict */
        if (rank == 0) st_cli_error("generate", st_error());
        MPI_Finalize();
        return ST_EXIT_FAIL;
    }
    st_answer *ans = NULL;
    float *dump = NULL;
    int vocab = 0;
    st_gen_stats stats = {0};
    f.stats = f.timing ? &stats : NULL;
    rc = st_gen_run(model, &f, &ps, MPI_COMM_WORLD, &ans, dump_path ? &dump : NULL, &vocab, &print_error);
    if (!rc && f.timing && rank == 0)
        fprintf(stderr, "timing (rank 0): prefill %ld tokens in %.4f s = %.1f tokens/s; decode %ld tokens in %.4f s = "
                        "%.1f tokens/s; cpu seconds: prefill %.4f, decode %.4f; decode steps on one thread: %ld of %ld; "
                        "weights held in bf16: %ld; resident MB after decoding: %.1f\n",
                stats.prefill_tokens,
                stats.prefill_s, stats.prefill_tokens / (stats.prefill_s > 0 ? stats.prefill_s : 1e-9),
                stats.decode_tokens, stats.decode_s, stats.decode_tokens / (stats.decode_s > 0 ? stats.decode_s : 1e-9),
                stats.prefill_cpu_s, stats.decode_cpu_s, stats.decode_team1_steps, stats.decode_steps,
                stats.hold_bf16_floats, stats.rss_mb);
    if (!rc && rank == 0) {
        rc = write_outputs(tmp, &ps, ans);
        print_error = rc != 0;
        if (rc) st_cli_out_end("generate", out, tmp, 0);
        else if ((rc = st_cli_out_end("generate", out, tmp, 1)) != 0) print_error = 0; /* it printed the reason */
        if (!rc && dump_path) print_error = (rc = write_dump(dump_path, dump, ans, ps.n, vocab)) != 0;
    }
    if (rc && print_error) st_cli_error("generate", st_error());
    st_answers_free(ans, ps.n);
    free(dump);
    int n = ps.n;
    st_prompts_free(&ps);
    MPI_Finalize();
    if (!rc && rank == 0) fprintf(stderr, "generate: %d answers written to %s\n", n, out);
    return rc ? ST_EXIT_FAIL : ST_EXIT_OK;
}
