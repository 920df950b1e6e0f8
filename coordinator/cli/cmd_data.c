/* cmd_data.c — `shardtune data pack (--jsonl IN.jsonl | --llmc-bin 'GLOB') --out DATA.h5 [--vocab V] [--eos ID]`
 * and `shardtune data pack --text IN.jsonl --model DIR --out DATA.h5 [--format F] [--template NAME|FILE]
 * [--train-on all|assistant|last]` (text/pack_text.h). Packs token data into the dataset file format (worker/dataset.h) and prints one summary line.
 * Exit 2 on a bad command line, 1 on any other failure; the output is written atomically, so a
 * failure never leaves a half-written DATA.h5 behind. */
#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "common/util.h"
#include "text/pack_text.h"
#include "worker/dataset.h"

#include <unistd.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *st_data_usage =
    "usage: shardtune data pack (--jsonl IN.jsonl | --llmc-bin 'GLOB') --out DATA.h5 [--vocab V] [--eos ID]\n"
    "       shardtune data pack --text IN.jsonl --model DIR --out DATA.h5 [--format auto|chat|alpaca|prompt|text]\n"
    "                           [--template NAME|FILE] [--train-on all|assistant|last]\n"
    "       (an existing non-empty DATA.h5 is refused unless --force; the file is written aside, then renamed)";

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

/* The progress line on a terminal (stderr): lines, MB/s, tokens, and % of the file when it has a size;
 * redrawn at most 5 times a second. */
typedef struct {
    double t0, last;
    int drawn;
} progress_state;

static void draw_progress(progress_state *p, uint64_t lines, uint64_t tokens, uint64_t done, uint64_t total) {
    double now = st_now();
    if (now - p->last < 0.2 && done != total) return;
    p->last = now;
    p->drawn = 1;
    double mb_s = now > p->t0 ? (double)done / 1e6 / (now - p->t0) : 0;
    fprintf(stderr, "\rpacking: %llu lines, %.1f MB/s, %llu tokens", (unsigned long long)lines, mb_s,
            (unsigned long long)tokens);
    if (total) fprintf(stderr, ", %.0f%%", 100.0 * (double)done / (double)total);
    fflush(stderr);
}

static void text_progress(void *ctx, const st_text_pack_stats *s, uint64_t done, uint64_t total) {
    draw_progress(ctx, s->lines, s->tokens, done, total);
}

static void jsonl_progress(void *ctx, uint64_t lines, uint64_t tokens, uint64_t done, uint64_t total) {
    draw_progress(ctx, lines, tokens, done, total);
}

static int emit_doc(void *ctx, const int32_t *ids, const uint8_t *mask, size_t n) {
    return st_dataset_writer_add(ctx, ids, mask, n);
}

/* --template: a file path, or a name from tokenizer_config.json's list of named templates. */
static int load_template(const char *model, const char *tpl, char **out) {
    *out = NULL;
    if (!tpl) return 0;
    size_t len;
    if (st_read_file(tpl, out, &len) == 0) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model);
    char *data = NULL;
    st_json *cfg = NULL;
    int found = 0;
    if (st_read_file(path, &data, &len) == 0 && st_json_parse(data, len, &cfg) == 0) {
        const st_json *ct = st_json_get(cfg, "chat_template");
        for (size_t i = 0; ct && ct->type == ST_JSON_ARRAY && i < ct->count && !found; i++) {
            const char *n = st_json_get_string(ct->items[i], "name", NULL), *s = st_json_get_string(ct->items[i], "template", NULL);
            if (n && s && !strcmp(n, tpl) && (*out = strdup(s))) found = 1;
        }
    }
    st_json_free(cfg);
    free(data);
    if (!found) return st_fail(ST_EINVAL, "--template %s: neither a readable file nor a template name in %s", tpl, path);
    return 0;
}

static int pack_text(const char *in, const char *model, const char *dst, const char *out, const char *format,
                     const char *tpl, const char *train_on) {
    st_sft_opts o = {ST_SFT_AUTO, ST_TRAIN_DEFAULT, NULL, NULL, 0};
    if (format && (o.format = st_sft_format_from_name(format)) < 0) return usage_error("--format must be auto, chat, alpaca, prompt or text, got", format);
    if (train_on && (o.train_on = st_sft_train_on_from_name(train_on)) < 0) return usage_error("--train-on must be all, assistant or last, got", train_on);
    st_tokenizer *tok = NULL;
    char *tsrc = NULL;
    int32_t *ends = NULL;
    size_t n_end = 0;
    int rc = st_tokenizer_load(model, &tok);
    if (rc == 0) rc = load_template(model, tpl, &tsrc);
    if (rc == 0) rc = st_sft_end_ids(model, tok, &ends, &n_end);
    if (rc < 0) { st_tokenizer_free(tok); return st_cli_error("data", st_error()); }
    o.template_src = tsrc ? tsrc : st_tokenizer_chat_template(tok);
    o.end_ids = ends, o.n_end = n_end;
    st_text_pack_stats s;
    st_dataset_writer *w = NULL;
    int64_t eos = n_end ? ends[0] : -1, vocab = (int64_t)st_tokenizer_vocab_size(tok);
    progress_state ps = {st_now(), 0, 0};
    rc = st_dataset_writer_open(&w, dst, vocab, eos); /* streamed: memory does not grow with the file */
    if (rc == 0) rc = st_text_pack(in, tok, &o, emit_doc, w, isatty(2) ? text_progress : NULL, &ps, &s);
    if (ps.drawn) fputc('\n', stderr);
    st_dataset_summary sum;
    if (rc == 0) rc = st_dataset_writer_close(w, &sum);
    else st_dataset_writer_abort(w);
    if (rc == 0)
        printf("packed docs=%llu tokens=%llu trained=%llu (chat=%llu alpaca=%llu prompt=%llu text=%llu) vocab=%lld eos=%lld -> %s\n",
               (unsigned long long)sum.docs, (unsigned long long)sum.tokens, (unsigned long long)s.trained,
               (unsigned long long)s.per_format[ST_SFT_CHAT], (unsigned long long)s.per_format[ST_SFT_ALPACA],
               (unsigned long long)s.per_format[ST_SFT_PROMPT], (unsigned long long)s.per_format[ST_SFT_TEXT],
               (long long)vocab, (long long)eos, out);
    free(ends), free(tsrc);
    st_tokenizer_free(tok);
    return rc < 0 ? st_cli_error("data", st_error()) : ST_EXIT_OK;
}

static int pack_ids(const char *jsonl, const char *llmc, long long vocab, long long eos, const char *dst,
                    const char *out);

int st_cmd_data(int argc, char **argv) {
    if (argc < 2) return usage_error("missing subcommand", NULL);
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        printf("%s\n", st_data_usage);
        return ST_EXIT_OK;
    }
    if (strcmp(argv[1], "pack") != 0) return usage_error("unknown subcommand", argv[1]);
    const char *jsonl = NULL, *llmc = NULL, *out = NULL, *text = NULL, *model = NULL, *format = NULL, *tpl = NULL,
               *train_on = NULL;
    long long vocab = 0, eos = -1;
    int force = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--force")) { force = 1; continue; }
        int known = !strcmp(a, "--jsonl") || !strcmp(a, "--llmc-bin") || !strcmp(a, "--out") ||
                    !strcmp(a, "--vocab") || !strcmp(a, "--eos") || !strcmp(a, "--text") || !strcmp(a, "--model") ||
                    !strcmp(a, "--format") || !strcmp(a, "--template") || !strcmp(a, "--train-on");
        if (!known) return usage_error("unknown argument", a);
        if (i + 1 >= argc) return usage_error("missing value after", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--text")) text = v;
        else if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--format")) format = v;
        else if (!strcmp(a, "--template")) tpl = v;
        else if (!strcmp(a, "--train-on")) train_on = v;
        else if (!strcmp(a, "--jsonl")) jsonl = v;
        else if (!strcmp(a, "--llmc-bin")) llmc = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--vocab")) {
            if (parse_int(v, 1, 1LL << 32, &vocab) != 0) return usage_error("--vocab needs an integer in 1..2^32, got", v);
        } else if (parse_int(v, 0, 0xffffffffLL, &eos) != 0) {
            return usage_error("--eos needs a non-negative token id, got", v);
        }
    }
    if (!!jsonl + !!llmc + !!text != 1) return usage_error("give exactly one of --jsonl, --llmc-bin or --text", NULL);
    if (!out) return usage_error("missing --out DATA.h5", NULL);
    if (text) {
        if (!model) return usage_error("--text needs --model DIR (its tokenizer.json and chat template)", NULL);
        if (vocab || eos >= 0) return usage_error("--vocab/--eos come from the model with --text", NULL);
        if (format && st_sft_format_from_name(format) < 0) return usage_error("--format must be auto, chat, alpaca, prompt or text, got", format);
        if (train_on && st_sft_train_on_from_name(train_on) < 0) return usage_error("--train-on must be all, assistant or last, got", train_on);
    } else if (model || format || tpl || train_on) {
        return usage_error("--model/--format/--template/--train-on go with --text", NULL);
    }
    char tmp[4200]; /* written aside, renamed over OUT at the end: a failure leaves OUT as it was */
    int rc = st_cli_out_begin("data", out, force, tmp, sizeof tmp);
    if (rc) return rc;
    rc = text ? pack_text(text, model, tmp, out, format, tpl, train_on) : pack_ids(jsonl, llmc, vocab, eos, tmp, out);
    if (rc) { st_cli_out_end("data", out, tmp, 0); return rc; }
    return st_cli_out_end("data", out, tmp, 1);
}

/* data pack --jsonl / --llmc-bin into dst (OUT's temporary sibling; `out` is what the lines name). */
static int pack_ids(const char *jsonl, const char *llmc, long long vocab, long long eos, const char *dst,
                    const char *out) {

    if (jsonl) { /* streamed (bounded memory) */
        progress_state ps = {st_now(), 0, 0};
        st_dataset_summary sum;
        int rc = st_dataset_pack_jsonl_file(jsonl, dst, vocab, eos, isatty(2) ? jsonl_progress : NULL, &ps, &sum);
        if (ps.drawn) fputc('\n', stderr);
        if (rc < 0 && strstr(st_error(), "missing \"input_ids\"")) {
            char msg[1400];
            snprintf(msg, sizeof msg, "%s (--jsonl takes token ids; for text rows use: data pack --text %s --model DIR --out %s)",
                     st_error(), jsonl, out);
            return st_cli_error("data", msg);
        }
        if (rc < 0) return st_cli_error("data", st_error());
        printf("packed docs=%llu tokens=%llu masked=%llu vocab=%lld eos=%lld -> %s\n", (unsigned long long)sum.docs,
               (unsigned long long)sum.tokens, (unsigned long long)sum.masked, (long long)sum.vocab_size,
               (long long)sum.eos_id, out);
        return ST_EXIT_OK;
    }
    st_dataset ds;
    int rc = st_dataset_pack_llmc(llmc, vocab, eos, &ds);
    if (rc < 0) return st_cli_error("data", st_error());
    rc = st_dataset_write(dst, &ds);
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
