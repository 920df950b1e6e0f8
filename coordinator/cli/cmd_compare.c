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
#include "coordinator/cli/commands.h"
#include "coordinator/generate/compare.h"
#include "coordinator/generate/gen_run.h"
#include "coordinator/generate/gen_text.h"

static int cmd_score(int argc, char **argv) {
    const char *dir = NULL, *votes = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--votes") && i + 1 < argc) votes = argv[++i];
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (argv[i][0] != '-' && !dir) dir = argv[i];
        else {
            st_cli_bad_arg("compare score", argv[i]);
            fprintf(stderr, "usage: shardtune compare score DIR --votes VOTES.jsonl [--json]\n");
            return ST_EXIT_USAGE;
        }
    }
    if (!dir || !votes) {
        st_cli_missing("compare score", !dir ? "DIR (the sheet's directory)" : "--votes VOTES.jsonl");
        fprintf(stderr, "usage: shardtune compare score DIR --votes VOTES.jsonl [--json]\n");
        return ST_EXIT_USAGE;
    }
    st_compare_result r;
    if (st_compare_score(dir, votes, &r)) return st_cli_error("compare score", st_error());
    if (r.superseded) /* stderr: --json's stdout stays one JSON object */
        fprintf(stderr, "shardtune compare score: note: %d vote%s superseded by a later vote of the same id (the "
                        "last vote of an id counts)\n", r.superseded, r.superseded == 1 ? "" : "s");
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
    long ln = -1;
    char *cur = data, *line = NULL;
    size_t l = 0;
    while (!rc && cur && st_jsonl_next(&cur, data + len, &ln, &line, &l)) {
        st_json *v = NULL;
        rc = st_json_parse(line, l, &v);
        if (rc) { st_fail_context(rc, "%s line %ld", path, ln + 1); break; }
        const st_json *out = st_json_get(v, "output"), *ids = st_json_get(v, "output_ids"), *id = st_json_get(v, "id");
        char idbuf[256] = "";
        st_json_id_text(id, idbuf, sizeof idbuf);
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
        st_gen_flags fm = *f;
        if (m == 0) fm.adapter = NULL; /* --adapter applies to the tuned model only */
        int rc = st_gen_run(dirs[m], &fm, ps, MPI_COMM_WORLD, &ans, NULL, NULL, print_error);
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
        if (c < 0) { fprintf(stderr, "shardtune compare sheet: error: %s\n", st_error()); return usage_sheet(); }
        if (c) continue;
        if (!strcmp(argv[i], "--base") && has) base = argv[++i];
        else if (!strcmp(argv[i], "--tuned") && has) tuned = argv[++i];
        else if (!strcmp(argv[i], "--adapter") && has) adapter = argv[++i];
        else if (!strcmp(argv[i], "--prompts") && has) prompts = argv[++i];
        else if (!strcmp(argv[i], "--out") && has) out = argv[++i];
        else if (!strcmp(argv[i], "--base-answers") && has) base_ans = argv[++i];
        else if (!strcmp(argv[i], "--tuned-answers") && has) tuned_ans = argv[++i];
        else { st_cli_bad_arg("compare sheet", argv[i]); return usage_sheet(); }
    }
    int from_models = base && tuned && !base_ans && !tuned_ans, from_files = base_ans && tuned_ans && !base && !tuned;
    if (!prompts || !out || !(from_models || from_files)) {
        st_cli_missing("compare sheet", !prompts ? "--prompts IN.jsonl" : !out ? "--out DIR"
                                  : "--base DIR and --tuned DIR (or --base-answers and --tuned-answers)");
        return usage_sheet();
    }
    int provided = 0, rank = 0, print_error = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    st_prompt_set ps = {0};
    f.adapter = adapter;
    int rc = adapter && !from_models
                 ? st_fail(ST_EINVAL, "--adapter %s applies to the tuned model: it needs --base and --tuned model directories", adapter)
                 : st_prompts_read(prompts, &ps);
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

/* ---------------- judge ---------------- */

/* The items of DIR/sheet.html (the JSON document the page carries). */
static int read_sheet_items(const char *dir, st_json **doc) {
    char path[4096], *html = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/sheet.html", dir);
    int rc = st_read_file(path, &html, &len);
    if (rc) return rc;
    const char *tag = "id=\"sheet-data\">";
    char *a = strstr(html, tag), *b = a ? strstr(a, "</script>") : NULL;
    if (!a || !b) rc = st_fail(ST_EFORMAT, "%s: no sheet data (not written by compare sheet?)", path);
    if (!rc) {
        a += strlen(tag);
        rc = st_json_parse(a, (size_t)(b - a), doc);
        if (rc) st_fail_context(rc, "%s", path);
    }
    const st_json *items = rc ? NULL : st_json_get(*doc, "items");
    if (!rc && (!items || items->type != ST_JSON_ARRAY || items->count == 0))
        rc = st_fail(ST_EFORMAT, "%s: the sheet data has no items", path);
    free(html);
    return rc;
}

/* The question put to the judge: the prompt and two answers, `first` shown as A. */
static char *judge_line(const char *prompt, const char *first, const char *second) {
    st_strbuf t = {0}, line = {0};
    st_strbuf_printf(&t, "Here is a question and two answers.\n\nQuestion:\n%s\n\nAnswer A:\n%s\n\nAnswer B:\n%s\n\n"
                         "Which answer is better, A or B? Reply with one letter.\nBetter answer:",
                     prompt, first, second);
    if (t.failed) { st_strbuf_free(&t); return NULL; }
    st_strbuf_printf(&line, "{\"prompt\": ");
    st_strbuf_json_string(&line, t.data);
    st_strbuf_printf(&line, "}");
    st_strbuf_free(&t);
    if (line.failed) { st_strbuf_free(&line); return NULL; }
    return line.data;
}

/* Token ids that start the label ("A" and " A"), deduplicated; n in 1..2. */
static int label_ids(const st_gen_text *t, char label, int32_t *out, int *n) {
    char s[3] = {label, 0, 0}, sp[3] = {' ', label, 0};
    const char *forms[2] = {s, sp};
    *n = 0;
    for (int k = 0; k < 2; k++) {
        int32_t *ids = NULL;
        int m = 0;
        int rc = st_gen_text_encode_plain(t, forms[k], 0, &ids, &m);
        if (rc) return rc;
        if (m >= 1 && (*n == 0 || out[0] != ids[0])) out[(*n)++] = ids[0];
        free(ids);
    }
    return *n ? 0 : st_fail(ST_EINVAL, "the judge's tokenizer has no token for the label %c", label);
}

static double label_mass(const float *logits, const int32_t *ids, int n) {
    double p = 0;
    for (int k = 0; k < n; k++) p += exp((double)logits[ids[k]]);
    return p;
}

/* P(first answer is better) from one order's next-token logits, relative to the two labels only. */
static double prefer_first(const float *logits, int V, const int32_t *la, int na, const int32_t *lb, int nb) {
    float mx = logits[0];
    for (int i = 1; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    float *sh = malloc((size_t)V * sizeof *sh);
    if (!sh) return 0.5;
    for (int i = 0; i < V; i++) sh[i] = logits[i] - mx;
    double a = label_mass(sh, la, na), b = label_mass(sh, lb, nb);
    free(sh);
    return a + b > 0 ? a / (a + b) : 0.5;
}

static int judge_run(const char *dir, const char *judge, const st_gen_flags *f, st_json *doc, int *print_error) {
    const st_json *items = st_json_get(doc, "items");
    int n = (int)items->count, rc = 0;
    st_prompt_set ps = {calloc((size_t)(2 * n), sizeof(st_prompt)), 2 * n};
    st_gen_text *tok = NULL;
    int32_t la[2], lb[2];
    int na = 0, nb = 0;
    if (!ps.p) return st_fail(ST_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < n; i++) {
        const char *id = st_json_get_string(items->items[i], "id", NULL);
        const char *q = st_json_get_string(items->items[i], "prompt", NULL);
        const char *a = st_json_get_string(items->items[i], "a", NULL), *b = st_json_get_string(items->items[i], "b", NULL);
        if (!id || !q || !a || !b) { rc = st_fail(ST_EFORMAT, "%s/sheet.html: item %d lacks id/prompt/a/b", dir, i); break; }
        for (int o = 0; o < 2; o++) { /* order 0: as on the page; order 1: swapped */
            st_prompt *p = &ps.p[2 * i + o];
            p->line = judge_line(q, o ? b : a, o ? a : b);
            p->id = strdup(id);
            p->is_text = 1;
            p->line_no = 2 * i + o + 1;
            if (!p->line || !p->id) rc = st_fail(ST_ENOMEM, "out of memory");
        }
    }
    if (!rc) rc = st_gen_text_open(judge, &tok);
    if (!rc && !tok) rc = st_fail(ST_EINVAL, "judge model %s has no tokenizer.json", judge);
    if (!rc) rc = label_ids(tok, 'A', la, &na);
    if (!rc) rc = label_ids(tok, 'B', lb, &nb);
    st_gen_flags jf = *f;
    jf.gp.max_new = 1;
    jf.gp.temperature = 0;
    jf.n_stop = 0;
    st_answer *ans = NULL;
    float *logits = NULL;
    int V = 0;
    if (!rc) {
        rc = st_gen_run(judge, &jf, &ps, MPI_COMM_WORLD, &ans, &logits, &V, print_error);
        if (rc) rc = st_fail_context(rc, "judge %s", judge);
    }
    st_strbuf votes = {0};
    for (int i = 0; !rc && i < n; i++) {
        /* each answer has exactly one token (max_new 1): its logits row is 2i + o */
        double p0 = prefer_first(logits + (size_t)(2 * i) * V, V, la, na, lb, nb);     /* A over B */
        double p1 = prefer_first(logits + (size_t)(2 * i + 1) * V, V, la, na, lb, nb); /* B over A */
        /* a side wins only when both orders prefer it: a position bias alone gives a tie */
        const char *v = p0 > 0.5 && p1 < 0.5 ? "A" : p0 < 0.5 && p1 > 0.5 ? "B" : "tie";
        st_strbuf_printf(&votes, "{\"id\": ");
        st_strbuf_json_string(&votes, ps.p[2 * i].id);
        st_strbuf_printf(&votes, ", \"vote\": \"%s\", \"p_a_first\": %.6f, \"p_a_second\": %.6f}\n", v, p0, 1 - p1);
    }
    if (!rc) {
        char path[4096];
        snprintf(path, sizeof path, "%s/judge_votes.jsonl", dir);
        rc = votes.failed ? st_fail(ST_ENOMEM, "out of memory") : st_write_file_atomic(path, votes.data, votes.len);
    }
    if (rc && !*print_error) *print_error = 1;
    st_strbuf_free(&votes);
    st_answers_free(ans, 2 * n);
    free(logits);
    st_gen_text_free(tok);
    st_prompts_free(&ps);
    return rc;
}

static int cmd_judge(int argc, char **argv) {
    const char *dir = NULL, *judge = NULL;
    int json = 0;
    st_gen_flags f;
    st_gen_flags_default(&f);
    for (int i = 1; i < argc; i++) {
        int c = st_gen_flags_parse(&f, argc, argv, &i);
        if (c < 0) { fprintf(stderr, "shardtune compare judge: error: %s\n", st_error()); return ST_EXIT_USAGE; }
        if (c) continue;
        if (!strcmp(argv[i], "--judge") && i + 1 < argc) judge = argv[++i];
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (argv[i][0] != '-' && !dir) dir = argv[i];
        else { st_cli_bad_arg("compare judge", argv[i]); dir = judge = NULL; break; }
    }
    if (!dir || !judge) {
        if (dir || judge || argc < 2) st_cli_missing("compare judge", !dir ? "DIR (the sheet's directory)" : "--judge MODEL_DIR");
        fprintf(stderr, "usage: shardtune compare judge DIR --judge MODEL_DIR [--json] [--chat] [--backend B]\n");
        return ST_EXIT_USAGE;
    }
    int provided = 0, world = 1, print_error = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    st_json *doc = NULL;
    int rc = world > 1 ? st_fail(ST_EINVAL, "compare judge runs on one rank (got %d)", world) : 0;
    if (!rc) rc = read_sheet_items(dir, &doc);
    if (!rc) rc = judge_run(dir, judge, &f, doc, &print_error);
    else print_error = 1;
    st_json_free(doc);
    MPI_Finalize();
    if (rc) return print_error ? st_cli_error("compare judge", st_error()) : ST_EXIT_FAIL;
    char votes[4096];
    snprintf(votes, sizeof votes, "%s/judge_votes.jsonl", dir);
    st_compare_result r;
    if (st_compare_score(dir, votes, &r)) return st_cli_error("compare judge", st_error());
    if (json)
        printf("{\"support\": %.6f, \"ci\": [%.6f, %.6f], \"wins\": %d, \"losses\": %d, \"ties\": %d, \"band\": \"%s\"}\n",
               r.support, r.lo, r.hi, r.wins, r.losses, r.ties, r.band);
    else
        printf("judge votes written to %s\nsupport: %.1f%% (tuned won %d of %d decided votes; %d ties apart)\n"
               "95%% CI (Wilson): %.1f%% - %.1f%%\nverdict: %s\n", votes, 100 * r.support, r.wins, r.wins + r.losses,
               r.ties, 100 * r.lo, 100 * r.hi, r.band);
    return ST_EXIT_OK;
}

int st_cmd_compare(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "sheet")) return cmd_sheet(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "score")) return cmd_score(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "judge")) return cmd_judge(argc - 1, argv + 1);
    if (argc >= 2) fprintf(stderr, "shardtune compare: error: unknown subcommand '%s' (sheet, score or judge)\n", argv[1]);
    else st_cli_missing("compare", "the subcommand (sheet, score or judge)");
    fprintf(stderr, "usage: shardtune compare sheet --base DIR --tuned DIR --prompts IN.jsonl --out DIR [--max-new N]\n"
                    "       shardtune compare score DIR --votes VOTES.jsonl [--json]\n"
                    "       shardtune compare judge DIR --judge MODEL_DIR [--json]\n");
    return ST_EXIT_USAGE;
}
