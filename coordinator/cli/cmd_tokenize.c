/* cmd_tokenize.c — `shardtune tokenize --model DIR [--decode] [--no-special]`.
 * stdin: one JSON string per line (or, with --decode, one JSON array of ids); stdout: one JSON array of
 * ids per line (or one JSON string), exactly as Hugging Face tokenizers' encode(...).ids / decode(...).
 * A bad line is one error naming the line number; lines already written stay written. */
#include "common/error.h"
#include "common/json.h"
#include "coordinator/cli/commands.h"
#include "text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *usage_text = "usage: shardtune tokenize --model DIR [--decode] [--no-special]";

/* A JSON string of s[0..n) (which may hold NUL bytes). */
static void json_string(st_strbuf *b, const char *s, size_t n) {
    st_strbuf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            st_strbuf_append(b, e, 2);
        } else if (c < 0x20 || c == 0x7f) st_strbuf_printf(b, "\\u%04x", c);
        else st_strbuf_append(b, s + i, 1);
    }
    st_strbuf_append(b, "\"", 1);
}

/* ", <id>" (or "<id>" first) without printf: formatting was a quarter of the encode time. */
static void append_id(st_strbuf *b, int32_t id, int comma) {
    char tmp[16], *e = tmp + sizeof tmp, *p = e;
    uint32_t v = id < 0 ? 0u - (uint32_t)id : (uint32_t)id;
    do *--p = (char)('0' + v % 10);
    while (v /= 10);
    if (id < 0) *--p = '-';
    if (comma) { *--p = ' '; *--p = ','; }
    st_strbuf_append(b, p, (size_t)(e - p));
}

static int encode_line(const st_tokenizer *tok, const st_json *v, int special, st_strbuf *out) {
    if (v->type != ST_JSON_STRING) return st_fail(ST_EINVAL, "expected a JSON string");
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = st_tokenizer_encode(tok, v->string, strlen(v->string), special, &ids, &n);
    if (rc < 0) return rc;
    st_strbuf_append(out, "[", 1);
    for (size_t i = 0; i < n; i++) append_id(out, ids[i], i > 0);
    st_strbuf_append(out, "]", 1);
    free(ids);
    return 0;
}

static int decode_line(const st_tokenizer *tok, const st_json *v, int skip, st_strbuf *out) {
    if (v->type != ST_JSON_ARRAY) return st_fail(ST_EINVAL, "expected a JSON array of token ids");
    int32_t *ids = malloc((v->count + 1) * sizeof *ids);
    if (!ids) return st_fail(ST_ENOMEM, "out of memory");
    for (size_t i = 0; i < v->count; i++) {
        const st_json *x = v->items[i];
        if (!x->is_integer || x->integer < 0 || x->integer > INT32_MAX) {
            free(ids);
            return st_fail(ST_EINVAL, "element %zu is not a token id", i);
        }
        ids[i] = (int32_t)x->integer;
    }
    char *text = NULL;
    size_t len = 0;
    int rc = st_tokenizer_decode(tok, ids, v->count, skip, &text, &len);
    free(ids);
    if (rc < 0) return rc;
    json_string(out, text, len);
    free(text);
    return 0;
}

int st_cmd_tokenize(int argc, char **argv) {
    const char *model = NULL;
    int decode = 0, special = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--decode")) decode = 1;
        else if (!strcmp(argv[i], "--no-special")) special = 0;
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) { printf("%s\n", usage_text); return ST_EXIT_OK; }
        else {
            fprintf(stderr, "shardtune tokenize: error: unknown or incomplete argument %s\n%s\n", argv[i], usage_text);
            return ST_EXIT_USAGE;
        }
    }
    if (!model) {
        fprintf(stderr, "shardtune tokenize: error: missing --model DIR\n%s\n", usage_text);
        return ST_EXIT_USAGE;
    }
    st_tokenizer *tok = NULL;
    if (st_tokenizer_load(model, &tok) < 0) return st_cli_error("tokenize", st_error());
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t len;
    int status = ST_EXIT_OK;
    st_strbuf out = {0};
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        st_json *v = NULL;
        out.len = 0;
        int rc = st_json_parse(line, (size_t)len, &v);
        if (rc == 0) rc = decode ? decode_line(tok, v, special, &out) : encode_line(tok, v, special, &out);
        st_json_free(v);
        if (rc == 0 && out.failed) rc = st_fail(ST_ENOMEM, "out of memory");
        if (rc < 0) {
            char msg[1200];
            snprintf(msg, sizeof msg, "stdin line %zu: %s", lineno, st_error());
            status = st_cli_error("tokenize", msg);
            break;
        }
        fwrite(out.data, 1, out.len, stdout);
        fputc('\n', stdout);
    }
    free(line);
    st_strbuf_free(&out);
    st_tokenizer_free(tok);
    if (fflush(stdout) != 0 && status == ST_EXIT_OK) status = st_cli_error("tokenize", "cannot write to stdout");
    return status;
}
