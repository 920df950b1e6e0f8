/* cmd_compare.c — `shardtune compare sheet|score`: the blind support-rate evaluation of a tuned model
 * against its base (DESIGN.md "compare contract", docs/generate.md).
 *
 *   sheet: generates both models' answers (or takes them from two `generate` output files), hides which
 *          is which per prompt (seeded shuffle), writes DIR/sheet.html (one self-contained page: the
 *          person votes A / B / tie with the keyboard and saves votes.jsonl) and DIR/key.json.
 *   score: unblinds a votes file with the key: support = tuned wins / decided votes, ties apart, the 95%
 *          Wilson interval and the verdict band. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"
#include "common/rng.h"
#include "common/util.h"
#include "coordinator/commands.h"
#include "coordinator/compare.h"
#include "coordinator/gen_run.h"

static int cmd_score(int argc, char **argv) {
    const char *dir = NULL, *votes = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--votes") && i + 1 < argc) votes = argv[++i];
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (argv[i][0] != '-' && !dir) dir = argv[i];
        else dir = NULL, i = argc;
    }
    if (!dir || !votes) {
        fprintf(stderr, "usage: shardtune compare score DIR --votes VOTES.jsonl [--json]\n");
        return ST_EXIT_USAGE;
    }
    st_compare_result r;
    if (st_compare_score(dir, votes, &r)) return st_cli_error("compare score", st_error());
    if (json) {
        printf("{\"support\": %.6f, \"ci\": [%.6f, %.6f], \"wins\": %d, \"losses\": %d, \"ties\": %d, \"band\": \"%s\"}\n",
               r.support, r.lo, r.hi, r.wins, r.losses, r.ties, r.band);
    } else {
        printf("support: %.1f%% (tuned won %d of %d decided votes; %d ties apart)\n", 100 * r.support, r.wins,
               r.wins + r.losses, r.ties);
        printf("95%% CI (Wilson): %.1f%% - %.1f%%\n", 100 * r.lo, 100 * r.hi);
        printf("verdict: %s\n", r.band);
    }
    return ST_EXIT_OK;
}

/* ---------------- sheet ---------------- */

/* The answer of prompt i as display text: the "output" field when the answers file has one, else the ids. */
static char *ids_text(const int32_t *ids, int n) {
    st_strbuf b = {0};
    for (int k = 0; k < n; k++) st_strbuf_printf(&b, "%s%d", k ? " " : "", ids[k]);
    if (!b.data) st_strbuf_append(&b, "", 0);
    return b.data;
}

/* Reads a `generate` output file: one answer per prompt, matched by position, its id checked. */
static int read_answer_file(const char *path, const st_prompt_set *ps, char **texts) {
    char *data = NULL;
    size_t len = 0;
    int rc = st_read_file(path, &data, &len), n = 0;
    long ln = 0;
    for (char *s = data; !rc && s && s < data + len; ln++) {
        char *e = memchr(s, '\n', (size_t)(data + len - s));
        if (!e) e = data + len;
        char *line = s;
        size_t l = (size_t)(e - s);
        s = e + 1;
        while (l > 0 && (line[l - 1] == '\r' || line[l - 1] == ' ')) l--;
        if (l == 0) continue;
        st_json *v = NULL;
        rc = st_json_parse(line, l, &v);
        if (rc) { st_fail_context(rc, "%s line %ld", path, ln + 1); break; }
        const st_json *out = st_json_get(v, "output"), *ids = st_json_get(v, "output_ids"), *id = st_json_get(v, "id");
        char idbuf[64] = "";
        if (id && id->type == ST_JSON_STRING) snprintf(idbuf, sizeof idbuf, "%s", id->string);
        else if (id && id->is_integer) snprintf(idbuf, sizeof idbuf, "%lld", (long long)id->integer);
        if (n >= ps->n) rc = st_fail(ST_EINVAL, "%s has more answers than the %d prompts", path, ps->n);
        else if (id && strcmp(idbuf, ps->p[n].id))
            rc = st_fail(ST_EINVAL, "%s line %ld: id \"%s\" where prompt %d has id \"%s\"", path, ln + 1, idbuf, n,
                         ps->p[n].id);
        else if (out && out->type == ST_JSON_STRING) texts[n] = strdup(out->string);
        else if (ids && ids->type == ST_JSON_ARRAY) {
            int32_t *tmp = malloc((ids->count + 1) * sizeof *tmp);
            for (size_t k = 0; tmp && k < ids->count; k++) tmp[k] = (int32_t)ids->items[k]->number;
            texts[n] = tmp ? ids_text(tmp, (int)ids->count) : NULL;
            free(tmp);
        } else rc = st_fail(ST_EFORMAT, "%s line %ld: no \"output\" or \"output_ids\"", path, ln + 1);
        if (!rc && !texts[n]) rc = st_fail(ST_ENOMEM, "out of memory");
        n++;
        st_json_free(v);
    }
    free(data);
    if (!rc && n != ps->n) rc = st_fail(ST_EINVAL, "%s has %d answers for %d prompts", path, n, ps->n);
    return rc;
}

/* Duplicate prompt ids would make the key ambiguous. */
static int check_unique_ids(const st_prompt_set *ps, const char *path) {
    for (int i = 0; i < ps->n; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(ps->p[i].id, ps->p[j].id))
                return st_fail(ST_EINVAL, "%s: prompts %d and %d share the id \"%s\" (ids must be unique)", path, j, i,
                               ps->p[i].id);
    return 0;
}

/* The display text of a prompt: its "prompt" text, else its last message's content, else its ids. */
static char *prompt_text(const st_prompt *p) {
    st_json *v = NULL;
    char *t = NULL;
    if (st_json_parse(p->line, strlen(p->line), &v) == 0) {
        const char *s = st_json_get_string(v, "prompt", NULL);
        const st_json *msgs = st_json_get(v, "messages");
        if (!s && msgs && msgs->type == ST_JSON_ARRAY && msgs->count)
            s = st_json_get_string(msgs->items[msgs->count - 1], "content", NULL);
        if (s) t = strdup(s);
        st_json_free(v);
    }
    return t ? t : ids_text(p->ids, p->n_ids);
}

static int usage_sheet(void) {
    fprintf(stderr, "usage: shardtune compare sheet --base DIR --tuned DIR [--adapter DIR] --prompts IN.jsonl --out DIR "
                    "[--max-new N] [--seed S] [generate flags]\n"
                    "       shardtune compare sheet --prompts IN.jsonl --base-answers A.jsonl --tuned-answers B.jsonl "
                    "--out DIR [--seed S]\n");
    return ST_EXIT_USAGE;
}

/* Both models' answers as display text (rank 0; NULL elsewhere). */
static int generate_both(const char *base, const char *tuned, const st_gen_flags *f, const st_prompt_set *ps,
                         char **tb, char **tt, int *print_error) {
    const char *dirs[2] = {base, tuned};
    char **texts[2] = {tb, tt};
    for (int m = 0; m < 2; m++) {
        st_answer *ans = NULL;
        int rc = st_gen_run(dirs[m], f, ps, MPI_COMM_WORLD, &ans, NULL, NULL, print_error);
        if (rc) return st_fail_context(rc, "%s model %s", m ? "tuned" : "base", dirs[m]);
        for (int i = 0; ans && i < ps->n; i++)
            texts[m][i] = ans[i].text ? strdup(ans[i].text) : ids_text(ans[i].ids, ans[i].n);
        st_answers_free(ans, ps->n);
    }
    return 0;
}

static int cmd_sheet(int argc, char **argv) {
    const char *base = NULL, *tuned = NULL, *prompts = NULL, *out = NULL, *adapter = NULL;
    const char *base_ans = NULL, *tuned_ans = NULL;
    st_gen_flags f;
    st_gen_flags_default(&f);
    for (int i = 1; i < argc; i++) {
        int has = i + 1 < argc, c = st_gen_flags_parse(&f, argc, argv, &i);
        if (c < 0) { fprintf(stderr, "shardtune compare sheet: %s\n", st_error()); return usage_sheet(); }
        if (c) continue;
        if (!strcmp(argv[i], "--base") && has) base = argv[++i];
        else if (!strcmp(argv[i], "--tuned") && has) tuned = argv[++i];
        else if (!strcmp(argv[i], "--adapter") && has) adapter = argv[++i];
        else if (!strcmp(argv[i], "--prompts") && has) prompts = argv[++i];
        else if (!strcmp(argv[i], "--out") && has) out = argv[++i];
        else if (!strcmp(argv[i], "--base-answers") && has) base_ans = argv[++i];
        else if (!strcmp(argv[i], "--tuned-answers") && has) tuned_ans = argv[++i];
        else return usage_sheet();
    }
    int from_models = base && tuned && !base_ans && !tuned_ans, from_files = base_ans && tuned_ans && !base && !tuned;
    if (!prompts || !out || !(from_models || from_files)) return usage_sheet();
    int provided = 0, rank = 0, print_error = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    st_prompt_set ps = {0};
    int rc = adapter ? st_fail(ST_EINVAL, "--adapter %s: PEFT adapters are not supported by this build yet", adapter) : 0;
    if (!rc) rc = st_prompts_read(prompts, &ps);
    if (!rc) rc = check_unique_ids(&ps, prompts);
    if (rc) {
        if (rank == 0) st_cli_error("compare sheet", st_error());
        MPI_Finalize();
        return ST_EXIT_FAIL;
    }
    char **tb = calloc((size_t)ps.n, sizeof *tb), **tt = calloc((size_t)ps.n, sizeof *tt);
    if (!tb || !tt) rc = st_fail(ST_ENOMEM, "out of memory");
    if (!rc && from_models) rc = generate_both(base, tuned, &f, &ps, tb, tt, &print_error);
    else if (!rc && rank == 0) {
        rc = read_answer_file(base_ans, &ps, tb);
        if (!rc) rc = read_answer_file(tuned_ans, &ps, tt);
        print_error = rc != 0;
    }
    if (!rc && rank == 0) {
        st_sheet_item *items = calloc((size_t)ps.n, sizeof *items);
        char **ptext = calloc((size_t)ps.n, sizeof *ptext);
        if (!items || !ptext) rc = st_fail(ST_ENOMEM, "out of memory");
        for (int i = 0; !rc && i < ps.n; i++) {
            items[i].id = ps.p[i].id;
            items[i].prompt = ptext[i] = prompt_text(&ps.p[i]);
            if (!ptext[i]) rc = st_fail(ST_ENOMEM, "out of memory");
            items[i].base = tb[i];
            items[i].tuned = tt[i];
        }
        if (!rc) rc = st_sheet_write(out, items, ps.n, f.gp.seed);
        for (int i = 0; ptext && i < ps.n; i++) free(ptext[i]);
        free(ptext);
        free(items);
        print_error = rc != 0;
    }
    if (rc && print_error) st_cli_error("compare sheet", st_error());
    for (int i = 0; i < ps.n; i++) {
        if (tb) free(tb[i]);
        if (tt) free(tt[i]);
    }
    free(tb);
    free(tt);
    if (!rc && rank == 0) printf("wrote %s/sheet.html and %s/key.json (%d prompts)\n", out, out, ps.n);
    st_prompts_free(&ps);
    MPI_Finalize();
    return rc ? ST_EXIT_FAIL : ST_EXIT_OK;
}

int st_cmd_compare(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "sheet")) return cmd_sheet(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "score")) return cmd_score(argc - 1, argv + 1);
    fprintf(stderr, "usage: shardtune compare sheet --base DIR --tuned DIR --prompts IN.jsonl --out DIR [--max-new N]\n"
                    "       shardtune compare score DIR --votes VOTES.jsonl [--json]\n");
    return ST_EXIT_USAGE;
}
