/* json.c — recursive-descent JSON parser with a depth limit, and the string builder (see json.h). */
#include "common/json.h"
#include "common/error.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ST_JSON_MAX_DEPTH 64

typedef struct {
    const char *s;
    size_t len, pos;
    int depth;
} parser;

static int perr(const parser *p, const char *what) {
    return st_fail(ST_EFORMAT, "invalid JSON at byte %zu: %s", p->pos, what);
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int parse_value(parser *p, st_json **out);

static int append_utf8(st_strbuf *b, unsigned cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); u[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    st_strbuf_append(b, u, n);
    return 0;
}

static int parse_hex4(parser *p, unsigned *out) {
    if (p->pos + 4 > p->len) return perr(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return perr(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

/* Parses a string starting at the opening quote into a malloc'ed C string. */
static int parse_string_raw(parser *p, char **out) {
    st_strbuf b = {0};
    p->pos++; /* opening quote */
    for (;;) {
        if (p->pos >= p->len) { st_strbuf_free(&b); return perr(p, "unterminated string"); }
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c == '"') break;
        if (c < 0x20) { st_strbuf_free(&b); return perr(p, "control character in string"); }
        if (c != '\\') { st_strbuf_append(&b, (const char *)&c, 1); continue; }
        if (p->pos >= p->len) { st_strbuf_free(&b); return perr(p, "unterminated escape"); }
        char e = p->s[p->pos++];
        char lit = 0;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            unsigned cp;
            if (parse_hex4(p, &cp)) { st_strbuf_free(&b); return ST_EFORMAT; }
            if (cp >= 0xD800 && cp < 0xDC00) {
                unsigned lo;
                if (p->pos + 2 > p->len || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    st_strbuf_free(&b);
                    return perr(p, "unpaired surrogate");
                }
                p->pos += 2;
                if (parse_hex4(p, &lo)) { st_strbuf_free(&b); return ST_EFORMAT; }
                if (lo < 0xDC00 || lo > 0xDFFF) { st_strbuf_free(&b); return perr(p, "bad low surrogate"); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp < 0xE000) {
                st_strbuf_free(&b);
                return perr(p, "unpaired surrogate");
            }
            if (cp == 0) { st_strbuf_free(&b); return perr(p, "\\u0000 not supported"); }
            append_utf8(&b, cp);
            continue;
        }
        default: st_strbuf_free(&b); return perr(p, "bad escape");
        }
        st_strbuf_append(&b, &lit, 1);
    }
    if (!b.data) st_strbuf_append(&b, "", 0);
    if (b.failed) { st_strbuf_free(&b); return st_fail(ST_ENOMEM, "out of memory parsing JSON"); }
    *out = b.data;
    return 0;
}

static st_json *new_node(st_json_type t) {
    st_json *v = calloc(1, sizeof *v);
    if (v) v->type = t;
    return v;
}

static int parse_number(parser *p, st_json *v) {
    size_t start = p->pos;
    int integral = 1;
    if (p->pos < p->len && p->s[p->pos] == '-') p->pos++;
    if (p->pos >= p->len) return perr(p, "truncated number");
    if (p->s[p->pos] == '0') p->pos++;
    else if (p->s[p->pos] >= '1' && p->s[p->pos] <= '9')
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    else return perr(p, "bad number");
    if (p->pos < p->len && p->s[p->pos] == '.') {
        integral = 0;
        p->pos++;
        size_t d = p->pos;
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
        if (p->pos == d) return perr(p, "bad fraction");
    }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        integral = 0;
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        size_t d = p->pos;
        while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
        if (p->pos == d) return perr(p, "bad exponent");
    }
    char tmp[64];
    size_t n = p->pos - start;
    if (n >= sizeof tmp) {
        /* long literals: still valid JSON, parse the double from a heap copy */
        char *big = malloc(n + 1);
        if (!big) return st_fail(ST_ENOMEM, "out of memory parsing JSON");
        memcpy(big, p->s + start, n);
        big[n] = 0;
        v->number = strtod(big, NULL);
        free(big);
        return 0;
    }
    memcpy(tmp, p->s + start, n);
    tmp[n] = 0;
    v->number = strtod(tmp, NULL);
    if (integral) {
        errno = 0;
        long long ll = strtoll(tmp, NULL, 10);
        if (errno == 0) { v->is_integer = 1; v->integer = ll; }
    }
    return 0;
}

static int grow(st_json *v, size_t *cap, int with_keys) {
    if (v->count < *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 8;
    st_json **ni = realloc(v->items, nc * sizeof *ni);
    if (!ni) return st_fail(ST_ENOMEM, "out of memory parsing JSON");
    v->items = ni;
    if (with_keys) {
        char **nk = realloc(v->keys, nc * sizeof *nk);
        if (!nk) return st_fail(ST_ENOMEM, "out of memory parsing JSON");
        v->keys = nk;
    }
    *cap = nc;
    return 0;
}

static int parse_array(parser *p, st_json *v) {
    size_t cap = 0;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == ']') { p->pos++; return 0; }
    for (;;) {
        if (grow(v, &cap, 0)) return ST_ENOMEM;
        int rc = parse_value(p, &v->items[v->count]);
        if (rc) { st_json_free(v->items[v->count]); return rc; } /* partial element is not counted */
        v->count++;
        skip_ws(p);
        if (p->pos >= p->len) return perr(p, "unterminated array");
        char c = p->s[p->pos++];
        if (c == ']') return 0;
        if (c != ',') return perr(p, "expected ',' or ']'");
    }
}

static int parse_object(parser *p, st_json *v) {
    size_t cap = 0;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == '}') { p->pos++; return 0; }
    for (;;) {
        skip_ws(p);
        if (p->pos >= p->len || p->s[p->pos] != '"') return perr(p, "expected a string key");
        if (grow(v, &cap, 1)) return ST_ENOMEM;
        char *key;
        int rc = parse_string_raw(p, &key);
        if (rc) return rc;
        skip_ws(p);
        if (p->pos >= p->len || p->s[p->pos] != ':') { free(key); return perr(p, "expected ':'"); }
        p->pos++;
        st_json *val = NULL;
        rc = parse_value(p, &val);
        if (rc) { free(key); st_json_free(val); return rc; }
        v->keys[v->count] = key;
        v->items[v->count] = val;
        v->count++;
        skip_ws(p);
        if (p->pos >= p->len) return perr(p, "unterminated object");
        char c = p->s[p->pos++];
        if (c == '}') return 0;
        if (c != ',') return perr(p, "expected ',' or '}'");
    }
}

static int match_literal(parser *p, const char *lit) {
    size_t n = strlen(lit);
    if (p->pos + n > p->len || memcmp(p->s + p->pos, lit, n) != 0) return perr(p, "unexpected token");
    p->pos += n;
    return 0;
}

static int parse_value(parser *p, st_json **out) {
    *out = NULL;
    skip_ws(p);
    if (p->pos >= p->len) return perr(p, "unexpected end of input");
    if (++p->depth > ST_JSON_MAX_DEPTH) return perr(p, "nesting too deep");
    char c = p->s[p->pos];
    st_json *v;
    int rc = 0;
    if (c == '{') { v = new_node(ST_JSON_OBJECT); if (v) rc = parse_object(p, v); }
    else if (c == '[') { v = new_node(ST_JSON_ARRAY); if (v) rc = parse_array(p, v); }
    else if (c == '"') { v = new_node(ST_JSON_STRING); if (v) rc = parse_string_raw(p, &v->string); }
    else if (c == 't') { v = new_node(ST_JSON_BOOL); if (v) { v->boolean = 1; rc = match_literal(p, "true"); } }
    else if (c == 'f') { v = new_node(ST_JSON_BOOL); if (v) rc = match_literal(p, "false"); }
    else if (c == 'n') { v = new_node(ST_JSON_NULL); if (v) rc = match_literal(p, "null"); }
    else if (c == '-' || (c >= '0' && c <= '9')) { v = new_node(ST_JSON_NUMBER); if (v) rc = parse_number(p, v); }
    else { p->depth--; return perr(p, "unexpected character"); }
    p->depth--;
    if (!v) return st_fail(ST_ENOMEM, "out of memory parsing JSON");
    *out = v; /* handed over even on error so the caller's free releases partial trees */
    return rc;
}

int st_json_parse(const char *text, size_t len, st_json **out) {
    parser p = {text, len, 0, 0};
    st_json *v = NULL;
    int rc = parse_value(&p, &v);
    if (rc == 0) {
        skip_ws(&p);
        if (p.pos != p.len) rc = perr(&p, "trailing characters after the value");
    }
    if (rc) { st_json_free(v); *out = NULL; return rc; }
    *out = v;
    return 0;
}

void st_json_free(st_json *v) {
    if (!v) return;
    for (size_t i = 0; i < v->count; i++) {
        st_json_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->string);
    free(v);
}

const st_json *st_json_get(const st_json *obj, const char *key) {
    if (!obj || obj->type != ST_JSON_OBJECT) return NULL;
    for (size_t i = 0; i < obj->count; i++)
        if (strcmp(obj->keys[i], key) == 0) return obj->items[i];
    return NULL;
}

int64_t st_json_get_int(const st_json *obj, const char *key, int64_t dflt, int *ok) {
    const st_json *v = st_json_get(obj, key);
    if (!v || v->type == ST_JSON_NULL) return dflt;
    if (v->type != ST_JSON_NUMBER || !v->is_integer) { if (ok) *ok = 0; return dflt; }
    return v->integer;
}

double st_json_get_number(const st_json *obj, const char *key, double dflt, int *ok) {
    const st_json *v = st_json_get(obj, key);
    if (!v || v->type == ST_JSON_NULL) return dflt;
    if (v->type != ST_JSON_NUMBER) { if (ok) *ok = 0; return dflt; }
    return v->number;
}

const char *st_json_get_string(const st_json *obj, const char *key, const char *dflt) {
    const st_json *v = st_json_get(obj, key);
    return (v && v->type == ST_JSON_STRING) ? v->string : dflt;
}

/* ---- string builder ---- */

static int reserve(st_strbuf *b, size_t extra) {
    if (b->failed) return -1;
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->len + extra + 1) nc *= 2;
    char *nd = realloc(b->data, nc);
    if (!nd) { b->failed = 1; return -1; }
    b->data = nd;
    b->cap = nc;
    return 0;
}

void st_strbuf_append(st_strbuf *b, const char *s, size_t n) {
    if (reserve(b, n)) return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

void st_strbuf_printf(st_strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void st_strbuf_json_string(st_strbuf *b, const char *s) {
    st_strbuf_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') { char e[2] = {'\\', (char)*p}; st_strbuf_append(b, e, 2); }
        else if (*p == '\n') st_strbuf_append(b, "\\n", 2);
        else if (*p == '\t') st_strbuf_append(b, "\\t", 2);
        else if (*p == '\r') st_strbuf_append(b, "\\r", 2);
        else if (*p < 0x20) st_strbuf_printf(b, "\\u%04x", *p);
        else st_strbuf_append(b, (const char *)p, 1);
    }
    st_strbuf_append(b, "\"", 1);
}

void st_strbuf_free(st_strbuf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}
