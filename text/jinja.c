/* jinja.c — a Jinja2 subset interpreter for chat templates, rendering as transformers'
 * apply_chat_template does: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
 * loopcontrols extension, transformers' tojson / raise_exception / strftime_now / namespace / dict, and its
 * {% generation %} block (rendered as its body).
 *
 * Supported: {{ }}, {% if/elif/else %}, {% for %} (tuple targets, `if` filter, else, loop.*), {% set %}
 * (names, namespace attributes, tuples, set blocks), break/continue, raw, comments, whitespace control
 * (-, +); expressions with Python semantics for the operators, literals, slices, calls, filters and
 * tests listed in docs/text.md. Anything else is an error naming the construct and its line.
 *
 * Memory: one arena per render holds the parsed template and every value; errors longjmp to
 * st_chat_render, which frees the arena, so no code path leaks. */
#include "text/tokenizer.h"

#include "common/error.h"
#include "text/unicode.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------ arena, errors */

typedef struct blk { struct blk *next; size_t used, cap; char data[]; } blk;

typedef struct jctx jctx;
static void *aalloc(jctx *c, size_t n);
static _Noreturn void jfail(jctx *c, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ------------------------------------------------------------------ values */

enum { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_NS, V_FN };
typedef struct jv jv;
struct jv {
    int t;
    int64_t i;          /* bool / int */
    double f;
    const char *s;      /* string bytes (NUL-terminated) / undefined name / function name */
    size_t n;           /* string length / item count */
    jv **items, **keys; /* list items, dict values (+ keys) */
    size_t cap;
    jv *self;           /* bound method receiver */
};

/* ------------------------------------------------------------------ tokens and nodes */

enum { T_TEXT, T_VB, T_VE, T_BB, T_BE, T_NAME, T_STR, T_INT, T_FLOAT, T_OP, T_EOF };
typedef struct { int t, line; const char *s; size_t n; int64_t i; double f; } jtok;

enum { N_BODY, N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_SETBLOCK, N_BREAK, N_CONTINUE, N_GEN,
       E_LIT, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NOT, E_NEG, E_POS, E_BIN, E_AND, E_OR,
       E_COND, E_LIST, E_DICT, E_TUPLE };
typedef struct jnd jnd;
struct jnd {
    int k, line, neg;
    const char *name, *op; /* names, operators, attribute */
    jv *val;
    jnd *a, *b, *c, *d;
    jnd **kids;  /* bodies, args, items */
    const char **kw; /* keyword names for call args (NULL = positional) */
    size_t nk;
    jnd **kids2; /* if: bodies; dict: values */
    size_t nk2;
};

struct jctx {
    jmp_buf jb;
    blk *arena;
    const char *name;
    jtok *tok;
    size_t ntok, ptok, captok;
    st_strbuf *out;
    /* scopes: each frame a dict */
    jv **frames;
    size_t nframes, capframes;
    jv *globals;
    int loop_ctl; /* 1 break, 2 continue */
    int depth, nest;
    uint64_t steps; /* evaluation budget: a template runs at most ST_JINJA_MAX_STEPS nodes */
    st_strbuf tmps[64]; /* temporary buffers (a stack), freed here when a failure longjmps past their users */
    int ntmp;
};
#define ST_JINJA_MAX_STEPS 20000000ull
#define ST_JINJA_MAX_STR (64u << 20)

static void *aalloc(jctx *c, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (!c->arena || c->arena->used + n > c->arena->cap) {
        size_t cap = n > 65536 ? n : 65536;
        blk *b = malloc(sizeof *b + cap);
        if (!b) { st_fail(ST_ENOMEM, "out of memory rendering a template"); longjmp(c->jb, 1); }
        b->next = c->arena, b->used = 0, b->cap = cap;
        c->arena = b;
    }
    void *p = c->arena->data + c->arena->used;
    c->arena->used += n;
    memset(p, 0, n);
    return p;
}

static _Noreturn void jfail(jctx *c, int line, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0) st_fail(ST_EINVAL, "%s line %d: %s", c->name, line, msg);
    else st_fail(ST_EINVAL, "%s: %s", c->name, msg);
    longjmp(c->jb, 1);
}

static st_strbuf *tmp_new(jctx *c) {
    if (c->ntmp == 64) jfail(c, 0, "strings nested too deeply");
    st_strbuf *b = &c->tmps[c->ntmp++];
    memset(b, 0, sizeof *b);
    return b;
}

/* Frees a temporary buffer and every one pushed after it. */
static void tmp_done(jctx *c, st_strbuf *b) {
    int k = (int)(b - c->tmps);
    while (c->ntmp > k) st_strbuf_free(&c->tmps[--c->ntmp]);
}

static char *astrndup(jctx *c, const char *s, size_t n) {
    char *d = aalloc(c, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static jv *mk(jctx *c, int t) { jv *v = aalloc(c, sizeof *v); v->t = t; return v; }
static jv *mk_int(jctx *c, int64_t i) { jv *v = mk(c, V_INT); v->i = i; return v; }
static jv *mk_float(jctx *c, double f) { jv *v = mk(c, V_FLOAT); v->f = f; return v; }
static jv *mk_bool(jctx *c, int b) { jv *v = mk(c, V_BOOL); v->i = !!b; return v; }
static jv *mk_strn(jctx *c, const char *s, size_t n) { jv *v = mk(c, V_STR); v->s = astrndup(c, s, n); v->n = n; return v; }
static jv *mk_str(jctx *c, const char *s) { return mk_strn(c, s, strlen(s)); }
static jv *mk_undef(jctx *c, const char *name) { jv *v = mk(c, V_UNDEF); v->s = name; return v; }
static jv *mk_fn(jctx *c, const char *name, jv *self) { jv *v = mk(c, V_FN); v->s = name; v->self = self; return v; }

static void push_item(jctx *c, jv *l, jv *key, jv *val) {
    if (++c->steps > ST_JINJA_MAX_STEPS) jfail(c, 0, "the template runs too long (over 20M steps)");
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        jv **ni = aalloc(c, cap * sizeof *ni);
        if (l->n) memcpy(ni, l->items, l->n * sizeof *ni);
        l->items = ni;
        if (l->t != V_LIST) {
            jv **nk = aalloc(c, cap * sizeof *nk);
            if (l->n) memcpy(nk, l->keys, l->n * sizeof *nk);
            l->keys = nk;
        }
        l->cap = cap;
    }
    if (l->t != V_LIST) l->keys[l->n] = key;
    l->items[l->n++] = val;
}

static int str_eq(const jv *v, const char *s) { return v->t == V_STR && strcmp(v->s, s) == 0; }

static jv *dict_get(jv *d, const char *key) {
    for (size_t i = 0; i < d->n; i++)
        if (str_eq(d->keys[i], key)) return d->items[i];
    return NULL;
}

static int veq(const jv *a, const jv *b);

static void dict_set(jctx *c, jv *d, jv *key, jv *val) {
    for (size_t i = 0; i < d->n; i++)
        if (veq(d->keys[i], key)) { d->items[i] = val; return; }
    push_item(c, d, key, val);
}

static int is_num(const jv *v) { return v->t == V_INT || v->t == V_FLOAT || v->t == V_BOOL; }
static double num(const jv *v) { return v->t == V_FLOAT ? v->f : (double)v->i; }

static int veq(const jv *a, const jv *b) {
    if (is_num(a) && is_num(b)) {
        if (a->t != V_FLOAT && b->t != V_FLOAT) return a->i == b->i;
        return num(a) == num(b);
    }
    if (a->t != b->t) return 0;
    switch (a->t) {
    case V_UNDEF: case V_NONE: return 1;
    case V_STR: return a->n == b->n && !memcmp(a->s, b->s, a->n);
    case V_LIST:
        if (a->n != b->n) return 0;
        for (size_t i = 0; i < a->n; i++) if (!veq(a->items[i], b->items[i])) return 0;
        return 1;
    case V_DICT:
        if (a->n != b->n) return 0;
        for (size_t i = 0; i < a->n; i++) {
            int found = 0;
            for (size_t j = 0; j < b->n && !found; j++)
                if (veq(a->keys[i], b->keys[j])) found = veq(a->items[i], b->items[j]) ? 1 : -1;
            if (found != 1) return 0;
        }
        return 1;
    default: return a == b;
    }
}

static int truthy(const jv *v) {
    switch (v->t) {
    case V_UNDEF: case V_NONE: return 0;
    case V_BOOL: case V_INT: return v->i != 0;
    case V_FLOAT: return v->f != 0;
    case V_STR: case V_LIST: case V_DICT: return v->n != 0;
    default: return 1;
    }
}

static const char *type_name(const jv *v) {
    static const char *names[] = {"undefined", "none", "bool", "int", "float", "str", "list", "dict", "namespace", "function"};
    return names[v->t];
}

/* Python's repr(float): the shortest digits that read back, positional for 1e-4 <= |x| < 1e16. */
static void fmt_float(st_strbuf *b, double x) {
    if (isnan(x)) { st_strbuf_append(b, "nan", 3); return; }
    if (isinf(x)) { st_strbuf_printf(b, "%sinf", x < 0 ? "-" : ""); return; }
    char buf[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (strtod(buf, NULL) == x) break;
    }
    /* buf: [-]d.ddde[+-]XX */
    char digits[32];
    size_t nd = 0;
    const char *p = buf;
    int neg = *p == '-';
    if (neg) p++;
    for (; *p && *p != 'e'; p++) if (*p != '.') digits[nd++] = *p;
    int exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    if (neg) st_strbuf_append(b, "-", 1);
    if (exp >= -5 + 1 && exp < 16) {
        if (exp < 0) {
            st_strbuf_append(b, "0.", 2);
            for (int i = 0; i < -exp - 1; i++) st_strbuf_append(b, "0", 1);
            st_strbuf_append(b, digits, nd);
        } else {
            for (int i = 0; i <= exp; i++) st_strbuf_append(b, i < (int)nd ? &digits[i] : "0", 1);
            st_strbuf_append(b, ".", 1);
            if ((int)nd > exp + 1) st_strbuf_append(b, digits + exp + 1, nd - (size_t)exp - 1);
            else st_strbuf_append(b, "0", 1);
        }
    } else {
        st_strbuf_append(b, digits, 1);
        if (nd > 1) { st_strbuf_append(b, ".", 1); st_strbuf_append(b, digits + 1, nd - 1); }
        st_strbuf_printf(b, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
}

static void py_repr(jctx *c, st_strbuf *b, const jv *v);

/* str(v) as Python prints it */
static void py_str(jctx *c, st_strbuf *b, const jv *v) {
    switch (v->t) {
    case V_UNDEF: return;
    case V_NONE: st_strbuf_append(b, "None", 4); return;
    case V_BOOL: st_strbuf_append(b, v->i ? "True" : "False", v->i ? 4 : 5); return;
    case V_INT: st_strbuf_printf(b, "%lld", (long long)v->i); return;
    case V_FLOAT: fmt_float(b, v->f); return;
    case V_STR: st_strbuf_append(b, v->s, v->n); return;
    default: py_repr(c, b, v);
    }
}

static void repr_str(st_strbuf *b, const char *s, size_t n) {
    int has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    st_strbuf_append(b, &q, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == (unsigned char)q || ch == '\\') { char e[2] = {'\\', (char)ch}; st_strbuf_append(b, e, 2); }
        else if (ch == '\n') st_strbuf_append(b, "\\n", 2);
        else if (ch == '\r') st_strbuf_append(b, "\\r", 2);
        else if (ch == '\t') st_strbuf_append(b, "\\t", 2);
        else if (ch < 0x20 || ch == 0x7f) st_strbuf_printf(b, "\\x%02x", ch);
        else st_strbuf_append(b, s + i, 1);
    }
    st_strbuf_append(b, &q, 1);
}

static void py_repr(jctx *c, st_strbuf *b, const jv *v) {
    switch (v->t) {
    case V_STR: repr_str(b, v->s, v->n); return;
    case V_LIST:
        st_strbuf_append(b, "[", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) st_strbuf_append(b, ", ", 2);
            py_repr(c, b, v->items[i]);
        }
        st_strbuf_append(b, "]", 1);
        return;
    case V_DICT:
        st_strbuf_append(b, "{", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) st_strbuf_append(b, ", ", 2);
            py_repr(c, b, v->keys[i]);
            st_strbuf_append(b, ": ", 2);
            py_repr(c, b, v->items[i]);
        }
        st_strbuf_append(b, "}", 1);
        return;
    case V_NS: st_strbuf_append(b, "<Namespace>", 11); return;
    case V_FN: st_strbuf_printf(b, "<function %s>", v->s); return;
    default: py_str(c, b, v);
    }
}

static const char *to_cstr(jctx *c, const jv *v, size_t *n) {
    if (v->t == V_STR) { if (n) *n = v->n; return v->s; }
    st_strbuf *b = tmp_new(c);
    py_str(c, b, v);
    char *s = astrndup(c, b->data ? b->data : "", b->len);
    if (n) *n = b->len;
    tmp_done(c, b);
    return s;
}

/* json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=sort) */
static void json_str(st_strbuf *b, const char *s, size_t n) {
    st_strbuf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '"': st_strbuf_append(b, "\\\"", 2); break;
        case '\\': st_strbuf_append(b, "\\\\", 2); break;
        case '\n': st_strbuf_append(b, "\\n", 2); break;
        case '\r': st_strbuf_append(b, "\\r", 2); break;
        case '\t': st_strbuf_append(b, "\\t", 2); break;
        case '\b': st_strbuf_append(b, "\\b", 2); break;
        case '\f': st_strbuf_append(b, "\\f", 2); break;
        default:
            if (ch < 0x20) st_strbuf_printf(b, "\\u%04x", ch);
            else st_strbuf_append(b, s + i, 1);
        }
    }
    st_strbuf_append(b, "\"", 1);
}

static void json_nl(st_strbuf *b, int indent, int level) {
    st_strbuf_append(b, "\n", 1);
    for (int i = 0; i < indent * level; i++) st_strbuf_append(b, " ", 1);
}

static void to_json(jctx *c, st_strbuf *b, const jv *v, int indent, int level, int sort, int line) {
    switch (v->t) {
    case V_NONE: st_strbuf_append(b, "null", 4); return;
    case V_BOOL: st_strbuf_append(b, v->i ? "true" : "false", v->i ? 4 : 5); return;
    case V_INT: st_strbuf_printf(b, "%lld", (long long)v->i); return;
    case V_FLOAT:
        if (isnan(v->f)) st_strbuf_append(b, "NaN", 3);
        else if (isinf(v->f)) st_strbuf_append(b, v->f < 0 ? "-Infinity" : "Infinity", v->f < 0 ? 9 : 8);
        else fmt_float(b, v->f);
        return;
    case V_STR: json_str(b, v->s, v->n); return;
    case V_LIST:
    case V_DICT: {
        int dict = v->t == V_DICT;
        st_strbuf_append(b, dict ? "{" : "[", 1);
        size_t *order = aalloc(c, (v->n + 1) * sizeof *order);
        for (size_t i = 0; i < v->n; i++) order[i] = i;
        if (dict && sort) /* insertion sort by key string */
            for (size_t i = 1; i < v->n; i++)
                for (size_t j = i; j > 0 && strcmp(to_cstr(c, v->keys[order[j - 1]], NULL), to_cstr(c, v->keys[order[j]], NULL)) > 0; j--) {
                    size_t t = order[j]; order[j] = order[j - 1]; order[j - 1] = t;
                }
        for (size_t k = 0; k < v->n; k++) {
            size_t i = order[k];
            if (k) st_strbuf_append(b, indent >= 0 ? "," : ", ", indent >= 0 ? 1 : 2);
            if (indent >= 0) json_nl(b, indent, level + 1);
            if (dict) {
                const jv *key = v->keys[i];
                if (key->t == V_STR) json_str(b, key->s, key->n);
                else if (key->t == V_NONE) st_strbuf_append(b, "\"null\"", 6);
                else if (key->t == V_BOOL) st_strbuf_append(b, key->i ? "\"true\"" : "\"false\"", key->i ? 6 : 7);
                else if (key->t == V_INT || key->t == V_FLOAT) { st_strbuf_append(b, "\"", 1); py_str(c, b, key); st_strbuf_append(b, "\"", 1); }
                else jfail(c, line, "tojson: keys must be str, int, float, bool or None, not %s", type_name(key));
                st_strbuf_append(b, ": ", 2);
            }
            to_json(c, b, v->items[i], indent, level + 1, sort, line);
        }
        if (indent >= 0 && v->n) json_nl(b, indent, level);
        st_strbuf_append(b, dict ? "}" : "]", 1);
        return;
    }
    default: jfail(c, line, "tojson: Object of type %s is not JSON serializable", type_name(v));
    }
}

static jv *from_json(jctx *c, const st_json *j) {
    switch (j->type) {
    case ST_JSON_NULL: return mk(c, V_NONE);
    case ST_JSON_BOOL: return mk_bool(c, j->boolean);
    case ST_JSON_NUMBER: return j->is_integer ? mk_int(c, j->integer) : mk_float(c, j->number);
    case ST_JSON_STRING: return mk_str(c, j->string);
    case ST_JSON_ARRAY: {
        jv *l = mk(c, V_LIST);
        for (size_t i = 0; i < j->count; i++) push_item(c, l, NULL, from_json(c, j->items[i]));
        return l;
    }
    default: {
        jv *d = mk(c, V_DICT);
        for (size_t i = 0; i < j->count; i++) push_item(c, d, mk_str(c, j->keys[i]), from_json(c, j->items[i]));
        return d;
    }
    }
}

/* ------------------------------------------------------------------ lexer */

static void add_tok(jctx *c, jtok t) {
    if (c->ntok == c->captok) {
        size_t cap = c->captok ? c->captok * 2 : 256;
        jtok *n = aalloc(c, cap * sizeof *n);
        if (c->ntok) memcpy(n, c->tok, c->ntok * sizeof *n);
        c->tok = n, c->captok = cap;
    }
    c->tok[c->ntok++] = t;
}

static int is_ws(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v'; }

static int count_lines(const char *s, size_t from, size_t to) {
    int n = 0;
    for (size_t i = from; i < to; i++) n += s[i] == '\n';
    return n;
}

/* String literal with Python's unicode-escape rules for the common escapes. */
static size_t lex_string(jctx *c, const char *s, size_t n, size_t i, int line, jtok *t) {
    char q = s[i++];
    st_strbuf *b = tmp_new(c);
    while (i < n && s[i] != q) {
        if (s[i] == '\\' && i + 1 < n) {
            char e = s[i + 1];
            const char *rep = NULL;
            switch (e) {
            case 'n': rep = "\n"; break;
            case 't': rep = "\t"; break;
            case 'r': rep = "\r"; break;
            case '\\': rep = "\\"; break;
            case '\'': rep = "'"; break;
            case '"': rep = "\""; break;
            case 'a': rep = "\a"; break;
            case 'b': rep = "\b"; break;
            case 'f': rep = "\f"; break;
            case 'v': rep = "\v"; break;
            case '\n': rep = ""; break;
            default: break;
            }
            if (rep) { st_strbuf_append(b, rep, strlen(rep)); i += 2; continue; }
            if (e == 'x' || e == 'u' || e == 'U') {
                int nd = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                uint32_t cp = 0;
                int ok = i + 2 + (size_t)nd <= n;
                for (int k = 0; ok && k < nd; k++) {
                    char h = s[i + 2 + k];
                    int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                    if (d < 0) ok = 0;
                    cp = cp * 16 + (uint32_t)(d < 0 ? 0 : d);
                }
                if (!ok || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) || cp == 0) { tmp_done(c, b); jfail(c, line, "bad \\%c escape in a string literal", e); }
                char u[4];
                st_strbuf_append(b, u, (size_t)st_utf8_encode(cp, u));
                i += 2 + (size_t)nd;
                continue;
            }
            st_strbuf_append(b, s + i, 2); /* unknown escapes stay as written */
            i += 2;
            continue;
        }
        st_strbuf_append(b, s + i, 1);
        i++;
    }
    if (i >= n) { tmp_done(c, b); jfail(c, line, "unterminated string literal"); }
    t->t = T_STR;
    t->s = astrndup(c, b->data ? b->data : "", b->len);
    t->n = b->len;
    tmp_done(c, b);
    return i + 1;
}

static const char *const OPS[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "(", ")",
                                  "[", "]", "{", "}", ",", ".", ":", "|", "=", ";", NULL};

/* Tokenizes a tag's inside s[i..end) */
static void lex_inside(jctx *c, const char *s, size_t i, size_t end, int line) {
    while (i < end) {
        char ch = s[i];
        if (is_ws(ch)) { line += ch == '\n'; i++; continue; }
        jtok t = {0};
        t.line = line;
        if (ch == '"' || ch == '\'') {
            size_t j = lex_string(c, s, end, i, line, &t);
            line += count_lines(s, i, j);
            i = j;
        } else if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_') {
            size_t j = i;
            while (j < end && ((s[j] >= 'a' && s[j] <= 'z') || (s[j] >= 'A' && s[j] <= 'Z') || s[j] == '_' || (s[j] >= '0' && s[j] <= '9'))) j++;
            t.t = T_NAME, t.s = astrndup(c, s + i, j - i), t.n = j - i;
            i = j;
        } else if (ch >= '0' && ch <= '9') {
            size_t j = i;
            int isf = 0;
            while (j < end && ((s[j] >= '0' && s[j] <= '9') || s[j] == '_')) j++;
            if (j + 1 < end && s[j] == '.' && s[j + 1] >= '0' && s[j + 1] <= '9') {
                isf = 1, j++;
                while (j < end && s[j] >= '0' && s[j] <= '9') j++;
            }
            if (j < end && (s[j] == 'e' || s[j] == 'E')) {
                size_t k = j + 1;
                if (k < end && (s[k] == '+' || s[k] == '-')) k++;
                if (k < end && s[k] >= '0' && s[k] <= '9') {
                    isf = 1, j = k;
                    while (j < end && s[j] >= '0' && s[j] <= '9') j++;
                }
            }
            char buf[64];
            size_t m = 0;
            for (size_t k = i; k < j && m < 63; k++) if (s[k] != '_') buf[m++] = s[k];
            buf[m] = 0;
            if (isf) t.t = T_FLOAT, t.f = strtod(buf, NULL);
            else t.t = T_INT, t.i = strtoll(buf, NULL, 10);
            i = j;
        } else {
            int k;
            for (k = 0; OPS[k]; k++) {
                size_t l = strlen(OPS[k]);
                if (i + l <= end && !memcmp(s + i, OPS[k], l)) break;
            }
            if (!OPS[k]) jfail(c, line, "unexpected character '%c'", ch);
            t.t = T_OP, t.s = OPS[k], t.n = strlen(OPS[k]);
            i += t.n;
        }
        add_tok(c, t);
    }
}

/* Finds the end of a tag (the closing "}}" / "%}"), skipping string literals. */
static size_t tag_end(const char *s, size_t n, size_t i, char close) {
    while (i + 1 < n) {
        if (s[i] == '"' || s[i] == '\'') {
            char q = s[i++];
            while (i < n && s[i] != q) i += s[i] == '\\' ? 2 : 1;
            i++;
            continue;
        }
        if (s[i] == close && s[i + 1] == '}') return i;
        i++;
    }
    return n;
}

static void lex(jctx *c, const char *s, size_t n) {
    size_t pos = 0;
    int line = 1, strip_next = 0;
    while (pos <= n) {
        size_t at = pos;
        while (at + 1 < n && !(s[at] == '{' && (s[at + 1] == '{' || s[at + 1] == '%' || s[at + 1] == '#'))) at++;
        if (at + 1 >= n) at = n;
        char kind = at < n ? s[at + 1] : 0;
        char mod = at + 2 < n ? s[at + 2] : 0;
        size_t ts = pos, te = at;
        if (strip_next) while (ts < te && is_ws(s[ts])) ts++;
        if (kind && mod == '-') {
            while (te > ts && is_ws(s[te - 1])) te--;
        } else if ((kind == '%' || kind == '#') && mod != '+') {
            size_t k = te;
            while (k > ts && (s[k - 1] == ' ' || s[k - 1] == '\t')) k--;
            /* only when the tag starts its line in the source */
            size_t r = k;
            while (r > 0 && (s[r - 1] == ' ' || s[r - 1] == '\t')) r--;
            if (r == 0 || s[r - 1] == '\n') te = k;
        }
        if (te > ts) add_tok(c, (jtok){T_TEXT, line, astrndup(c, s + ts, te - ts), te - ts, 0, 0});
        line += count_lines(s, pos, at);
        if (!kind) break;
        size_t inner = at + 2 + (mod == '-' || mod == '+');
        size_t close;
        if (kind == '#') {
            close = inner;
            while (close + 1 < n && !(s[close] == '#' && s[close + 1] == '}')) close++;
            if (close + 1 >= n) jfail(c, line, "unterminated comment");
        } else {
            close = tag_end(s, n, inner, kind == '{' ? '}' : '%');
            if (close >= n) jfail(c, line, "unterminated %s", kind == '{' ? "{{ ... }}" : "{% ... %}");
        }
        char endmod = close > inner && (s[close - 1] == '-' || s[close - 1] == '+') ? s[close - 1] : 0;
        size_t inner_end = endmod ? close - 1 : close;
        if (kind != '#') {
            /* {% raw %} ... {% endraw %}: verbatim text */
            size_t a = inner, b = inner_end;
            while (a < b && is_ws(s[a])) a++;
            while (b > a && is_ws(s[b - 1])) b--;
            if (kind == '%' && b - a == 3 && !memcmp(s + a, "raw", 3)) {
                const char *e = strstr(s + close, "endraw");
                if (!e) jfail(c, line, "{%% raw %%} without {%% endraw %%}");
                size_t es = (size_t)(e - s);
                while (es > close && s[es - 1] != '{') es--;
                if (es <= close + 2) jfail(c, line, "malformed {%% endraw %%}");
                size_t text_end = es - 1;
                size_t rs = close + 2;
                if (endmod != '+' && endmod != '-' && rs < n && s[rs] == '\n') rs++;
                if (s[es] == '-') while (text_end > rs && is_ws(s[text_end - 1])) text_end--;
                if (text_end > rs) add_tok(c, (jtok){T_TEXT, line, astrndup(c, s + rs, text_end - rs), text_end - rs, 0, 0});
                size_t ec = tag_end(s, n, (size_t)(e - s), '%');
                if (ec >= n) jfail(c, line, "unterminated {%% endraw %%}");
                line += count_lines(s, at, ec);
                strip_next = s[ec - 1] == '-';
                pos = ec + 2;
                if (!strip_next && pos < n && s[pos] == '\n') pos++, line++;
                continue;
            }
            add_tok(c, (jtok){kind == '{' ? T_VB : T_BB, line, NULL, 0, 0, 0});
            lex_inside(c, s, inner, inner_end, line);
            add_tok(c, (jtok){kind == '{' ? T_VE : T_BE, line, NULL, 0, 0, 0});
        }
        line += count_lines(s, at, close);
        pos = close + 2;
        strip_next = endmod == '-';
        if (!strip_next && kind != '{' && endmod != '+' && pos < n && s[pos] == '\n') pos++, line++;
    }
    add_tok(c, (jtok){T_EOF, line, NULL, 0, 0, 0});
}

/* ------------------------------------------------------------------ parser */

static jtok *peek(jctx *c) { return &c->tok[c->ptok]; }
static jtok *next(jctx *c) { jtok *t = &c->tok[c->ptok]; if (t->t != T_EOF) c->ptok++; return t; }
static int is_op(jctx *c, const char *op) { jtok *t = peek(c); return t->t == T_OP && !strcmp(t->s, op); }
static int is_name(jctx *c, const char *name) { jtok *t = peek(c); return t->t == T_NAME && !strcmp(t->s, name); }
static int accept_op(jctx *c, const char *op) { if (is_op(c, op)) { next(c); return 1; } return 0; }
static int accept_name(jctx *c, const char *name) { if (is_name(c, name)) { next(c); return 1; } return 0; }

static const char *tok_desc(jtok *t) {
    switch (t->t) {
    case T_TEXT: return "template text";
    case T_VB: return "'{{'";
    case T_VE: return "'}}'";
    case T_BB: return "'{%'";
    case T_BE: return "'%}'";
    case T_EOF: return "end of template";
    default: return t->s ? t->s : "a literal";
    }
}

static void expect_op(jctx *c, const char *op) {
    if (!accept_op(c, op)) jfail(c, peek(c)->line, "expected '%s', got %s", op, tok_desc(peek(c)));
}

static const char *expect_name(jctx *c) {
    jtok *t = next(c);
    if (t->t != T_NAME) jfail(c, t->line, "expected a name, got %s", tok_desc(t));
    return t->s;
}

static jnd *node(jctx *c, int k, int line) { jnd *n = aalloc(c, sizeof *n); n->k = k; n->line = line; return n; }

static void add_kid(jctx *c, jnd *n, jnd *kid, const char *kw) {
    jnd **nk = aalloc(c, (n->nk + 1) * sizeof *nk);
    const char **nkw = aalloc(c, (n->nk + 1) * sizeof *nkw);
    if (n->nk) { memcpy(nk, n->kids, n->nk * sizeof *nk); memcpy(nkw, n->kw, n->nk * sizeof *nkw); }
    nk[n->nk] = kid, nkw[n->nk] = kw;
    n->kids = nk, n->kw = nkw, n->nk++;
}

static void add_kid2(jctx *c, jnd *n, jnd *kid) {
    jnd **nk = aalloc(c, (n->nk2 + 1) * sizeof *nk);
    if (n->nk2) memcpy(nk, n->kids2, n->nk2 * sizeof *nk);
    nk[n->nk2++] = kid;
    n->kids2 = nk;
}

static jnd *parse_expr(jctx *c);
static jnd *parse_or(jctx *c);

static void parse_args(jctx *c, jnd *call) {
    /* after '(' */
    while (!accept_op(c, ")")) {
        const char *kw = NULL;
        if (peek(c)->t == T_NAME && c->tok[c->ptok + 1].t == T_OP && !strcmp(c->tok[c->ptok + 1].s, "=")) {
            kw = next(c)->s;
            next(c);
        }
        add_kid(c, call, parse_expr(c), kw);
        if (!is_op(c, ")")) expect_op(c, ",");
    }
}

static jnd *parse_primary(jctx *c) {
    jtok *t = next(c);
    jnd *n;
    switch (t->t) {
    case T_STR: {
        n = node(c, E_LIT, t->line);
        st_strbuf *b = tmp_new(c);
        st_strbuf_append(b, t->s, t->n);
        while (peek(c)->t == T_STR) { jtok *u = next(c); st_strbuf_append(b, u->s, u->n); } /* adjacent literals */
        n->val = mk_strn(c, b->data ? b->data : "", b->len);
        tmp_done(c, b);
        return n;
    }
    case T_INT: n = node(c, E_LIT, t->line); n->val = mk_int(c, t->i); return n;
    case T_FLOAT: n = node(c, E_LIT, t->line); n->val = mk_float(c, t->f); return n;
    case T_NAME:
        n = node(c, E_LIT, t->line);
        if (!strcmp(t->s, "true") || !strcmp(t->s, "True")) n->val = mk_bool(c, 1);
        else if (!strcmp(t->s, "false") || !strcmp(t->s, "False")) n->val = mk_bool(c, 0);
        else if (!strcmp(t->s, "none") || !strcmp(t->s, "None")) n->val = mk(c, V_NONE);
        else { n->k = E_NAME; n->name = t->s; }
        return n;
    case T_OP:
        if (!strcmp(t->s, "(")) {
            if (accept_op(c, ")")) return node(c, E_TUPLE, t->line);
            jnd *e = parse_expr(c);
            if (is_op(c, ",")) {
                jnd *tu = node(c, E_TUPLE, t->line);
                add_kid(c, tu, e, NULL);
                while (accept_op(c, ",") && !is_op(c, ")")) add_kid(c, tu, parse_expr(c), NULL);
                e = tu;
            }
            expect_op(c, ")");
            return e;
        }
        if (!strcmp(t->s, "[")) {
            n = node(c, E_LIST, t->line);
            while (!accept_op(c, "]")) {
                add_kid(c, n, parse_expr(c), NULL);
                if (!is_op(c, "]")) expect_op(c, ",");
            }
            return n;
        }
        if (!strcmp(t->s, "{")) {
            n = node(c, E_DICT, t->line);
            while (!accept_op(c, "}")) {
                add_kid(c, n, parse_expr(c), NULL);
                expect_op(c, ":");
                add_kid2(c, n, parse_expr(c));
                if (!is_op(c, "}")) expect_op(c, ",");
            }
            return n;
        }
        /* fallthrough */
    default: jfail(c, t->line, "unexpected %s in an expression", tok_desc(t));
    }
}

static jnd *parse_postfix(jctx *c, jnd *e) {
    for (;;) {
        int line = peek(c)->line;
        if (accept_op(c, ".")) {
            jtok *t = next(c);
            jnd *n = node(c, E_ATTR, line);
            n->a = e;
            if (t->t == T_NAME) n->name = t->s;
            else if (t->t == T_INT) { n->k = E_ITEM; n->b = node(c, E_LIT, line); n->b->val = mk_int(c, t->i); }
            else jfail(c, line, "expected an attribute name after '.'");
            e = n;
        } else if (accept_op(c, "[")) {
            jnd *parts[3] = {NULL, NULL, NULL};
            int colons = 0;
            while (!is_op(c, "]")) {
                if (accept_op(c, ":")) { if (++colons > 2) jfail(c, line, "bad slice"); continue; }
                if (parts[colons]) jfail(c, line, "expected ':' or ']' in a subscript");
                parts[colons] = parse_expr(c);
            }
            next(c);
            jnd *n = node(c, colons ? E_SLICE : E_ITEM, line);
            n->a = e;
            if (colons) n->b = parts[0], n->c = parts[1], n->d = parts[2];
            else {
                if (!parts[0]) jfail(c, line, "empty subscript");
                n->b = parts[0];
            }
            e = n;
        } else if (accept_op(c, "(")) {
            jnd *n = node(c, E_CALL, line);
            n->a = e;
            parse_args(c, n);
            e = n;
        } else return e;
    }
}

static jnd *parse_filters(jctx *c, jnd *e) {
    for (;;) {
        int line = peek(c)->line;
        if (accept_op(c, "|")) {
            jnd *n = node(c, E_FILTER, line);
            n->a = e;
            n->name = expect_name(c);
            while (accept_op(c, ".")) n->name = expect_name(c); /* dotted filter names: use the last part */
            if (accept_op(c, "(")) parse_args(c, n);
            e = n;
        } else if (accept_name(c, "is")) {
            jnd *n = node(c, E_TEST, line);
            n->a = e;
            n->neg = accept_name(c, "not");
            jtok *t = next(c);
            if (t->t == T_NAME) n->name = t->s;
            else if (t->t == T_OP && (!strcmp(t->s, "==") || !strcmp(t->s, "!=") || !strcmp(t->s, "<") || !strcmp(t->s, ">") ||
                                      !strcmp(t->s, "<=") || !strcmp(t->s, ">=")))
                n->name = t->s;
            else jfail(c, line, "expected a test name after 'is'");
            if (accept_op(c, "(")) parse_args(c, n);
            else {
                jtok *u = peek(c);
                if (u->t == T_STR || u->t == T_INT || u->t == T_FLOAT ||
                    (u->t == T_NAME && strcmp(u->s, "and") && strcmp(u->s, "or") && strcmp(u->s, "if") && strcmp(u->s, "else") &&
                     strcmp(u->s, "is") && strcmp(u->s, "in") && strcmp(u->s, "not")))
                    add_kid(c, n, parse_postfix(c, parse_primary(c)), NULL);
            }
            e = n;
        } else return e;
    }
}

static jnd *parse_unary(jctx *c, int with_filter) {
    int line = peek(c)->line;
    if (++c->depth > 200) jfail(c, line, "expression nested too deeply");
    jnd *e;
    if (accept_op(c, "-")) { e = node(c, E_NEG, line); e->a = parse_unary(c, 0); }
    else if (accept_op(c, "+")) { e = node(c, E_POS, line); e->a = parse_unary(c, 0); }
    else e = parse_postfix(c, parse_primary(c));
    c->depth--;
    return with_filter ? parse_filters(c, e) : e;
}

static jnd *bin(jctx *c, const char *op, jnd *a, jnd *b, int line) {
    jnd *n = node(c, E_BIN, line);
    n->op = op, n->a = a, n->b = b;
    return n;
}

static jnd *parse_pow(jctx *c) {
    jnd *e = parse_unary(c, 1);
    while (is_op(c, "**")) { int l = next(c)->line; e = bin(c, "**", e, parse_unary(c, 1), l); }
    return e;
}

static jnd *parse_math2(jctx *c) {
    jnd *e = parse_pow(c);
    while (is_op(c, "*") || is_op(c, "/") || is_op(c, "//") || is_op(c, "%")) {
        jtok *t = next(c);
        e = bin(c, t->s, e, parse_pow(c), t->line);
    }
    return e;
}

static jnd *parse_concat(jctx *c) {
    jnd *e = parse_math2(c);
    while (is_op(c, "~")) { int l = next(c)->line; e = bin(c, "~", e, parse_math2(c), l); }
    return e;
}

static jnd *parse_math1(jctx *c) {
    jnd *e = parse_concat(c);
    while (is_op(c, "+") || is_op(c, "-")) {
        jtok *t = next(c);
        e = bin(c, t->s, e, parse_concat(c), t->line);
    }
    return e;
}

static jnd *parse_compare(jctx *c) {
    jnd *e = parse_math1(c);
    for (;;) {
        jtok *t = peek(c);
        int line = t->line;
        if (t->t == T_OP && (!strcmp(t->s, "==") || !strcmp(t->s, "!=") || !strcmp(t->s, "<") || !strcmp(t->s, ">") ||
                             !strcmp(t->s, "<=") || !strcmp(t->s, ">="))) {
            next(c);
            e = bin(c, t->s, e, parse_math1(c), line);
        } else if (accept_name(c, "in")) {
            e = bin(c, "in", e, parse_math1(c), line);
        } else if (is_name(c, "not") && c->tok[c->ptok + 1].t == T_NAME && !strcmp(c->tok[c->ptok + 1].s, "in")) {
            next(c), next(c);
            e = bin(c, "not in", e, parse_math1(c), line);
        } else return e;
    }
}

static jnd *parse_not(jctx *c) {
    int line = peek(c)->line;
    if (accept_name(c, "not")) {
        if (++c->depth > 200) jfail(c, line, "expression nested too deeply");
        jnd *n = node(c, E_NOT, line);
        n->a = parse_not(c);
        c->depth--;
        return n;
    }
    return parse_compare(c);
}

static jnd *parse_and(jctx *c) {
    jnd *e = parse_not(c);
    while (is_name(c, "and")) { int l = next(c)->line; jnd *n = node(c, E_AND, l); n->a = e; n->b = parse_not(c); e = n; }
    return e;
}

static jnd *parse_or(jctx *c) {
    jnd *e = parse_and(c);
    while (is_name(c, "or")) { int l = next(c)->line; jnd *n = node(c, E_OR, l); n->a = e; n->b = parse_and(c); e = n; }
    return e;
}

static jnd *parse_expr(jctx *c) {
    if (++c->depth > 200) jfail(c, peek(c)->line, "expression nested too deeply");
    jnd *e = parse_or(c);
    while (is_name(c, "if")) {
        int l = next(c)->line;
        jnd *n = node(c, E_COND, l);
        n->a = parse_or(c); /* condition */
        n->b = e;
        if (accept_name(c, "else")) n->c = parse_expr(c);
        e = n;
    }
    c->depth--;
    return e;
}

/* An expression or a bare tuple "a, b" (for/set targets and values). */
static jnd *parse_tuple(jctx *c, int names_only) {
    int line = peek(c)->line;
    jnd *e = names_only ? parse_primary(c) : parse_expr(c);
    if (!is_op(c, ",")) return e;
    jnd *t = node(c, E_TUPLE, line);
    add_kid(c, t, e, NULL);
    while (accept_op(c, ",")) {
        if (peek(c)->t == T_BE || is_name(c, "in") || is_op(c, "=")) break;
        add_kid(c, t, names_only ? parse_primary(c) : parse_expr(c), NULL);
    }
    return t;
}

static void expect_block_end(jctx *c) {
    jtok *t = next(c);
    if (t->t != T_BE) jfail(c, t->line, "expected '%%}', got %s", tok_desc(t));
}

static jnd *parse_body(jctx *c, const char *const *ends, const char **which);

static jnd *parse_statement1(jctx *c, int line);

static jnd *parse_statement(jctx *c, int line) {
    if (++c->nest > 100) jfail(c, line, "blocks nested more than 100 deep");
    jnd *n = parse_statement1(c, line);
    c->nest--;
    return n;
}

static jnd *parse_statement1(jctx *c, int line) {
    const char *kw = expect_name(c);
    if (!strcmp(kw, "if")) {
        jnd *n = node(c, N_IF, line);
        add_kid(c, n, parse_expr(c), NULL);
        expect_block_end(c);
        static const char *const ends[] = {"elif", "else", "endif", NULL};
        for (;;) {
            const char *which;
            add_kid2(c, n, parse_body(c, ends, &which));
            if (!strcmp(which, "endif")) { expect_block_end(c); break; }
            if (!strcmp(which, "elif")) { add_kid(c, n, parse_expr(c), NULL); expect_block_end(c); continue; }
            expect_block_end(c); /* else */
            static const char *const endif[] = {"endif", NULL};
            n->a = parse_body(c, endif, &which);
            expect_block_end(c);
            break;
        }
        return n;
    }
    if (!strcmp(kw, "for")) {
        jnd *n = node(c, N_FOR, line);
        n->a = parse_tuple(c, 1);
        if (!accept_name(c, "in")) jfail(c, line, "expected 'in' in a for loop");
        c->depth = 0;
        n->b = parse_or(c);
        if (accept_name(c, "if")) n->c = parse_expr(c);
        if (is_name(c, "recursive")) jfail(c, line, "recursive for loops are not supported");
        expect_block_end(c);
        static const char *const ends[] = {"else", "endfor", NULL};
        const char *which;
        n->kids2 = aalloc(c, sizeof *n->kids2);
        n->kids2[0] = parse_body(c, ends, &which);
        n->nk2 = 1;
        expect_block_end(c);
        if (!strcmp(which, "else")) {
            static const char *const endfor[] = {"endfor", NULL};
            n->d = parse_body(c, endfor, &which);
            expect_block_end(c);
        }
        return n;
    }
    if (!strcmp(kw, "set")) {
        jnd *target = parse_tuple(c, 0);
        if (target->k != E_NAME && target->k != E_TUPLE && target->k != E_ATTR)
            jfail(c, line, "cannot assign to this {%% set %%} target");
        if (accept_op(c, "=")) {
            jnd *n = node(c, N_SET, line);
            n->a = target;
            n->b = parse_tuple(c, 0);
            expect_block_end(c);
            return n;
        }
        if (target->k != E_NAME) jfail(c, line, "a {%% set %%} block needs a plain name");
        if (is_op(c, "|")) jfail(c, line, "filtered {%% set %%} blocks are not supported");
        expect_block_end(c);
        jnd *n = node(c, N_SETBLOCK, line);
        n->a = target;
        static const char *const ends[] = {"endset", NULL};
        const char *which;
        n->b = parse_body(c, ends, &which);
        expect_block_end(c);
        return n;
    }
    if (!strcmp(kw, "break") || !strcmp(kw, "continue")) {
        expect_block_end(c);
        return node(c, kw[0] == 'b' ? N_BREAK : N_CONTINUE, line);
    }
    if (!strcmp(kw, "generation")) {
        expect_block_end(c);
        jnd *n = node(c, N_GEN, line);
        static const char *const ends[] = {"endgeneration", NULL};
        const char *which;
        n->a = parse_body(c, ends, &which);
        expect_block_end(c);
        return n;
    }
    jfail(c, line, "{%% %s %%} is not supported", kw);
}

static jnd *parse_body(jctx *c, const char *const *ends, const char **which) {
    jnd *body = node(c, N_BODY, peek(c)->line);
    for (;;) {
        jtok *t = next(c);
        if (t->t == T_EOF) {
            if (ends) jfail(c, t->line, "missing {%% %s %%}", ends[0][0] == 'e' && ends[1] ? ends[1] : ends[0]);
            return body;
        }
        if (t->t == T_TEXT) {
            jnd *n = node(c, N_TEXT, t->line);
            n->val = mk_strn(c, t->s, t->n);
            add_kid(c, body, n, NULL);
        } else if (t->t == T_VB) {
            jnd *n = node(c, N_OUT, t->line);
            c->depth = 0;
            n->a = parse_tuple(c, 0);
            jtok *e = next(c);
            if (e->t != T_VE) jfail(c, e->line, "expected '}}', got %s", tok_desc(e));
            add_kid(c, body, n, NULL);
        } else if (t->t == T_BB) {
            jtok *k = peek(c);
            if (k->t == T_NAME && ends)
                for (int i = 0; ends[i]; i++)
                    if (!strcmp(k->s, ends[i])) { next(c); *which = ends[i]; return body; }
            if (k->t == T_NAME && (!strncmp(k->s, "end", 3) || !strcmp(k->s, "else") || !strcmp(k->s, "elif")))
                jfail(c, k->line, "unexpected {%% %s %%}", k->s);
            c->depth = 0;
            add_kid(c, body, parse_statement(c, t->line), NULL);
        } else jfail(c, t->line, "unexpected %s", tok_desc(t));
    }
}

/* ------------------------------------------------------------------ evaluation */

static jv *eval(jctx *c, jnd *e);
static void exec_body(jctx *c, jnd *b);

static jv *lookup(jctx *c, const char *name) {
    for (size_t i = c->nframes; i-- > 0;) {
        jv *v = dict_get(c->frames[i], name);
        if (v) return v;
    }
    jv *g = dict_get(c->globals, name);
    return g ? g : mk_undef(c, name);
}

static void push_frame(jctx *c) {
    if (c->nframes == c->capframes) {
        size_t cap = c->capframes ? c->capframes * 2 : 16;
        jv **f = aalloc(c, cap * sizeof *f);
        if (c->nframes) memcpy(f, c->frames, c->nframes * sizeof *f);
        c->frames = f, c->capframes = cap;
    }
    c->frames[c->nframes++] = mk(c, V_DICT);
}

static void assign(jctx *c, jnd *target, jv *v, int line) {
    if (target->k == E_NAME) { dict_set(c, c->frames[c->nframes - 1], mk_str(c, target->name), v); return; }
    if (target->k == E_ATTR) {
        jv *ns = eval(c, target->a);
        if (ns->t != V_NS) jfail(c, line, "cannot assign attribute '%s' on a %s (only on a namespace)", target->name, type_name(ns));
        if (target->name[0] == '_') jfail(c, line, "namespace attributes cannot start with '_'");
        dict_set(c, ns, mk_str(c, target->name), v);
        return;
    }
    if (target->k == E_TUPLE) {
        if (v->t != V_LIST) jfail(c, line, "cannot unpack a %s", type_name(v));
        if (v->n != target->nk) jfail(c, line, "cannot unpack %zu values into %zu names", v->n, target->nk);
        for (size_t i = 0; i < v->n; i++) assign(c, target->kids[i], v->items[i], line);
        return;
    }
    jfail(c, line, "cannot assign to this target");
}

/* code point offsets of a string for indexing/slicing */
static size_t cp_count(const char *s, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

static size_t cp_offset(const char *s, size_t n, size_t idx) {
    size_t k = 0, i = 0;
    for (; i < n; i++) {
        if (((unsigned char)s[i] & 0xC0) != 0x80) { if (k == idx) return i; k++; }
    }
    return n;
}

static jv *index_value(jctx *c, jv *obj, jv *key, int line);

static jv *getattr_v(jctx *c, jv *obj, const char *name, int line) {
    if (obj->t == V_UNDEF) jfail(c, line, "'%s' is undefined", obj->s ? obj->s : "value");
    static const char *const str_methods[] = {"strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith",
                                              "upper", "lower", "title", "capitalize", "replace", "find", "count",
                                              "join", "splitlines", "isdigit", "isspace", "isalpha", NULL};
    static const char *const dict_methods[] = {"items", "keys", "values", "get", NULL};
    if (obj->t == V_STR)
        for (int i = 0; str_methods[i]; i++) if (!strcmp(name, str_methods[i])) return mk_fn(c, name, obj);
    if (obj->t == V_DICT) {
        for (int i = 0; dict_methods[i]; i++) if (!strcmp(name, dict_methods[i])) return mk_fn(c, name, obj);
        jv *v = dict_get(obj, name);
        return v ? v : mk_undef(c, name);
    }
    if (obj->t == V_NS) { jv *v = dict_get(obj, name); return v ? v : mk_undef(c, name); }
    return mk_undef(c, name);
}

/* obj[key]: item lookup first, then (for string keys) attribute lookup, as Jinja's getitem does. */
static jv *index_value(jctx *c, jv *obj, jv *key, int line) {
    if (obj->t == V_UNDEF) jfail(c, line, "'%s' is undefined", obj->s ? obj->s : "value");
    if (obj->t == V_DICT || obj->t == V_NS) {
        for (size_t i = 0; i < obj->n; i++) if (veq(obj->keys[i], key)) return obj->items[i];
        if (key->t == V_STR && obj->t == V_DICT) return getattr_v(c, obj, key->s, line);
        return mk_undef(c, key->t == V_STR ? key->s : "item");
    }
    if ((obj->t == V_LIST || obj->t == V_STR) && (key->t == V_INT || key->t == V_BOOL)) {
        int64_t n = obj->t == V_LIST ? (int64_t)obj->n : (int64_t)cp_count(obj->s, obj->n), i = key->i;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return mk_undef(c, "index");
        if (obj->t == V_LIST) return obj->items[i];
        size_t a = cp_offset(obj->s, obj->n, (size_t)i), b = cp_offset(obj->s, obj->n, (size_t)i + 1);
        return mk_strn(c, obj->s + a, b - a);
    }
    if (key->t == V_STR) return getattr_v(c, obj, key->s, line);
    return mk_undef(c, "item");
}

static int64_t to_index(jctx *c, jv *v, int line) {
    if (v->t == V_INT || v->t == V_BOOL) return v->i;
    jfail(c, line, "slice indices must be integers, not %s", type_name(v));
}

static jv *slice_value(jctx *c, jv *obj, jv *a, jv *b, jv *st, int line) {
    if (obj->t != V_LIST && obj->t != V_STR) jfail(c, line, "cannot slice a %s", type_name(obj));
    int64_t n = obj->t == V_LIST ? (int64_t)obj->n : (int64_t)cp_count(obj->s, obj->n);
    int64_t step = st && st->t != V_NONE ? to_index(c, st, line) : 1;
    if (step == 0) jfail(c, line, "slice step cannot be zero");
    int64_t lo, hi;
    if (step > 0) {
        lo = a && a->t != V_NONE ? to_index(c, a, line) : 0;
        hi = b && b->t != V_NONE ? to_index(c, b, line) : n;
        lo = lo < 0 ? (lo + n < 0 ? 0 : lo + n) : (lo > n ? n : lo);
        hi = hi < 0 ? (hi + n < 0 ? 0 : hi + n) : (hi > n ? n : hi);
    } else {
        lo = a && a->t != V_NONE ? to_index(c, a, line) : n - 1;
        hi = b && b->t != V_NONE ? to_index(c, b, line) : -n - 1;
        lo = lo < 0 ? (lo + n < -1 ? -1 : lo + n) : (lo > n - 1 ? n - 1 : lo);
        if (hi < -1) { hi += n; if (hi < -1) hi = -1; }
        if (hi > n - 1) hi = n - 1;
    }
    jv *out = mk(c, V_LIST);
    st_strbuf *sb = tmp_new(c);
    for (int64_t i = lo; step > 0 ? i < hi : i > hi; i += step) {
        if (obj->t == V_LIST) push_item(c, out, NULL, obj->items[i]);
        else {
            size_t x = cp_offset(obj->s, obj->n, (size_t)i), y = cp_offset(obj->s, obj->n, (size_t)i + 1);
            st_strbuf_append(sb, obj->s + x, y - x);
        }
    }
    if (obj->t == V_STR) {
        jv *s = mk_strn(c, sb->data ? sb->data : "", sb->len);
        tmp_done(c, sb);
        return s;
    }
    return out;
}

static int py_isspace(uint32_t cp) { return st_uc_is_space(cp) || (cp >= 0x1C && cp <= 0x1F); }

/* str.strip / lstrip / rstrip with optional chars */
static jv *strip_str(jctx *c, jv *s, const char *chars, int left, int right) {
    size_t a = 0, b = s->n;
    uint32_t cp;
    while (left && a < b) {
        int l = st_utf8_decode((const unsigned char *)s->s + a, b - a, &cp);
        int in = chars ? (memchr(chars, s->s[a], strlen(chars)) != NULL && l == 1) || (l > 1 && strstr(chars, astrndup(c, s->s + a, (size_t)l)))
                       : py_isspace(cp);
        if (!in) break;
        a += (size_t)l;
    }
    while (right && b > a) {
        size_t q = b - 1;
        while (q > a && ((unsigned char)s->s[q] & 0xC0) == 0x80) q--;
        st_utf8_decode((const unsigned char *)s->s + q, b - q, &cp);
        int in = chars ? strstr(chars, astrndup(c, s->s + q, b - q)) != NULL : py_isspace(cp);
        if (!in) break;
        b = q;
    }
    return mk_strn(c, s->s + a, b - a);
}

static jv *split_str(jctx *c, jv *s, jv *sep, int64_t maxsplit) {
    jv *out = mk(c, V_LIST);
    if (!sep || sep->t == V_NONE) {
        size_t i = 0;
        uint32_t cp;
        while (i < s->n) {
            while (i < s->n) { int l = st_utf8_decode((const unsigned char *)s->s + i, s->n - i, &cp); if (!py_isspace(cp)) break; i += (size_t)l; }
            if (i >= s->n) break;
            size_t j = i;
            if (maxsplit >= 0 && (int64_t)out->n >= maxsplit) {
                /* the rest, right-stripped */
                size_t e = s->n;
                while (e > j) { size_t q = e - 1; while (q > j && ((unsigned char)s->s[q] & 0xC0) == 0x80) q--; st_utf8_decode((const unsigned char *)s->s + q, e - q, &cp); if (!py_isspace(cp)) break; e = q; }
                push_item(c, out, NULL, mk_strn(c, s->s + j, e - j));
                break;
            }
            while (j < s->n) { int l = st_utf8_decode((const unsigned char *)s->s + j, s->n - j, &cp); if (py_isspace(cp)) break; j += (size_t)l; }
            push_item(c, out, NULL, mk_strn(c, s->s + i, j - i));
            i = j;
        }
        return out;
    }
    if (sep->t != V_STR || !sep->n) jfail(c, 0, "split: empty or non-string separator");
    size_t i = 0;
    for (;;) {
        size_t j = i;
        int found = 0;
        if (!(maxsplit >= 0 && (int64_t)out->n >= maxsplit))
            for (; j + sep->n <= s->n; j++) if (!memcmp(s->s + j, sep->s, sep->n)) { found = 1; break; }
        if (!found) { push_item(c, out, NULL, mk_strn(c, s->s + i, s->n - i)); break; }
        push_item(c, out, NULL, mk_strn(c, s->s + i, j - i));
        i = j + sep->n;
    }
    return out;
}

static jv *replace_str(jctx *c, jv *s, jv *a, jv *b, int64_t count) {
    if (a->t != V_STR || b->t != V_STR) jfail(c, 0, "replace() needs strings");
    st_strbuf *o = tmp_new(c);
    int64_t done = 0;
    for (size_t i = 0; i < s->n;) {
        if ((count < 0 || done < count) && (a->n ? (i + a->n <= s->n && !memcmp(s->s + i, a->s, a->n)) : 1)) {
            st_strbuf_append(o, b->s, b->n);
            done++;
            if (a->n) { i += a->n; continue; }
        }
        st_strbuf_append(o, s->s + i, 1);
        i++;
    }
    jv *r = mk_strn(c, o->data ? o->data : "", o->len);
    tmp_done(c, o);
    return r;
}

static jv *case_str(jctx *c, jv *s, int mode) { /* 0 upper 1 lower 2 title 3 capitalize (ASCII letters) */
    char *d = astrndup(c, s->s, s->n);
    int prev_cased = 0;
    for (size_t i = 0; i < s->n; i++) {
        char ch = d[i];
        int is_alpha = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
        if (mode == 0 && ch >= 'a' && ch <= 'z') d[i] = (char)(ch - 32);
        else if (mode == 1 && ch >= 'A' && ch <= 'Z') d[i] = (char)(ch + 32);
        else if (mode == 2 && is_alpha) d[i] = (char)(prev_cased ? (ch | 32) : (ch & ~32));
        else if (mode == 3 && is_alpha) d[i] = (char)(i == 0 ? (ch & ~32) : (ch | 32));
        prev_cased = is_alpha || (((unsigned char)ch) >= 0x80 && prev_cased);
    }
    jv *v = mk(c, V_STR);
    v->s = d, v->n = s->n;
    return v;
}

/* argument access helpers */
typedef struct { jv **pos; size_t npos; const char **kwn; jv **kwv; size_t nkw; } jargs;

static jv *arg(jargs *a, size_t i, const char *kw) {
    for (size_t k = 0; k < a->nkw; k++) if (!strcmp(a->kwn[k], kw)) return a->kwv[k];
    return i < a->npos ? a->pos[i] : NULL;
}

static void eval_args(jctx *c, jnd *call, size_t skip, jargs *a) {
    a->pos = aalloc(c, (call->nk + 1) * sizeof *a->pos);
    a->kwn = aalloc(c, (call->nk + 1) * sizeof *a->kwn);
    a->kwv = aalloc(c, (call->nk + 1) * sizeof *a->kwv);
    a->npos = a->nkw = 0;
    for (size_t i = skip; i < call->nk; i++) {
        jv *v = eval(c, call->kids[i]);
        if (call->kw[i]) a->kwn[a->nkw] = call->kw[i], a->kwv[a->nkw++] = v;
        else a->pos[a->npos++] = v;
    }
}

static jv *iter_list(jctx *c, jv *v, int line) {
    if (v->t == V_LIST) return v;
    jv *l = mk(c, V_LIST);
    if (v->t == V_UNDEF) return l;
    if (v->t == V_DICT || v->t == V_NS) { for (size_t i = 0; i < v->n; i++) push_item(c, l, NULL, v->keys[i]); return l; }
    if (v->t == V_STR) {
        for (size_t i = 0; i < v->n;) {
            uint32_t cp;
            int k = st_utf8_decode((const unsigned char *)v->s + i, v->n - i, &cp);
            push_item(c, l, NULL, mk_strn(c, v->s + i, (size_t)k));
            i += (size_t)k;
        }
        return l;
    }
    jfail(c, line, "'%s' object is not iterable", type_name(v));
}

static jv *call_method(jctx *c, jv *fn, jargs *a, int line) {
    jv *s = fn->self;
    const char *m = fn->s;
    if (s->t == V_DICT) {
        if (!strcmp(m, "get")) {
            jv *k = arg(a, 0, "key");
            if (!k) jfail(c, line, "get() needs a key");
            for (size_t i = 0; i < s->n; i++) if (veq(s->keys[i], k)) return s->items[i];
            jv *d = arg(a, 1, "default");
            return d ? d : mk(c, V_NONE);
        }
        jv *out = mk(c, V_LIST);
        for (size_t i = 0; i < s->n; i++) {
            if (!strcmp(m, "keys")) push_item(c, out, NULL, s->keys[i]);
            else if (!strcmp(m, "values")) push_item(c, out, NULL, s->items[i]);
            else {
                jv *pair = mk(c, V_LIST);
                push_item(c, pair, NULL, s->keys[i]);
                push_item(c, pair, NULL, s->items[i]);
                push_item(c, out, NULL, pair);
            }
        }
        return out;
    }
    /* string methods */
    jv *a0 = arg(a, 0, "__0"), *a1 = arg(a, 1, "__1");
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        const char *chars = a0 && a0->t == V_STR ? a0->s : NULL;
        return strip_str(c, s, chars, m[0] != 'r', m[0] != 'l');
    }
    if (!strcmp(m, "split")) {
        jv *ms = arg(a, 1, "maxsplit");
        return split_str(c, s, arg(a, 0, "sep"), ms ? to_index(c, ms, line) : -1);
    }
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
        if (!a0) jfail(c, line, "%s() needs an argument", m);
        jv *opts = a0->t == V_LIST ? a0 : NULL;
        for (size_t k = 0; k < (opts ? opts->n : 1); k++) {
            jv *p = opts ? opts->items[k] : a0;
            if (p->t != V_STR) jfail(c, line, "%s() needs a string", m);
            if (p->n <= s->n && !memcmp(m[0] == 's' ? s->s : s->s + s->n - p->n, p->s, p->n)) return mk_bool(c, 1);
        }
        return mk_bool(c, 0);
    }
    if (!strcmp(m, "upper")) return case_str(c, s, 0);
    if (!strcmp(m, "lower")) return case_str(c, s, 1);
    if (!strcmp(m, "title")) return case_str(c, s, 2);
    if (!strcmp(m, "capitalize")) return case_str(c, s, 3);
    if (!strcmp(m, "replace")) {
        if (!a0 || !a1) jfail(c, line, "replace() needs two arguments");
        jv *cnt = arg(a, 2, "count");
        return replace_str(c, s, a0, a1, cnt ? to_index(c, cnt, line) : -1);
    }
    if (!strcmp(m, "find") || !strcmp(m, "count")) {
        if (!a0 || a0->t != V_STR) jfail(c, line, "%s() needs a string", m);
        int64_t cnt = 0;
        for (size_t i = 0; i + a0->n <= s->n;) {
            if (!memcmp(s->s + i, a0->s, a0->n)) {
                if (m[0] == 'f') return mk_int(c, (int64_t)cp_count(s->s, i));
                cnt++;
                i += a0->n ? a0->n : 1;
            } else i++;
        }
        return mk_int(c, m[0] == 'f' ? -1 : cnt);
    }
    if (!strcmp(m, "join")) {
        if (!a0) jfail(c, line, "join() needs an argument");
        jv *l = iter_list(c, a0, line);
        st_strbuf *o = tmp_new(c);
        for (size_t i = 0; i < l->n; i++) {
            if (i) st_strbuf_append(o, s->s, s->n);
            if (l->items[i]->t != V_STR) { tmp_done(c, o); jfail(c, line, "join(): item %zu is not a string", i); }
            st_strbuf_append(o, l->items[i]->s, l->items[i]->n);
        }
        jv *r = mk_strn(c, o->data ? o->data : "", o->len);
        tmp_done(c, o);
        return r;
    }
    if (!strcmp(m, "isdigit") || !strcmp(m, "isspace") || !strcmp(m, "isalpha")) {
        if (!s->n) return mk_bool(c, 0);
        for (size_t i = 0; i < s->n;) {
            uint32_t cp;
            i += (size_t)st_utf8_decode((const unsigned char *)s->s + i, s->n - i, &cp);
            int ok = m[2] == 'd' ? (cp >= '0' && cp <= '9') : m[2] == 's' ? py_isspace(cp) : st_uc_is_letter(cp);
            if (!ok) return mk_bool(c, 0);
        }
        return mk_bool(c, 1);
    }
    jfail(c, line, "str.%s() is not supported", m);
}

static jv *do_filter(jctx *c, const char *f, jv *v, jargs *a, int line);

static jv *call_value(jctx *c, jnd *e) {
    jnd *fe = e->a;
    jargs a;
    if (fe->k == E_NAME && !lookup(c, fe->name)->t) {
        const char *name = fe->name;
        eval_args(c, e, 0, &a);
        if (!strcmp(name, "raise_exception")) {
            jv *m = arg(&a, 0, "message");
            jfail(c, e->line, "raise_exception: %s", m ? to_cstr(c, m, NULL) : "");
        }
        if (!strcmp(name, "range")) {
            int64_t lo = 0, hi, st = 1;
            if (a.npos == 1) hi = to_index(c, a.pos[0], e->line);
            else if (a.npos >= 2) {
                lo = to_index(c, a.pos[0], e->line), hi = to_index(c, a.pos[1], e->line);
                if (a.npos > 2) st = to_index(c, a.pos[2], e->line);
            } else jfail(c, e->line, "range() needs arguments");
            if (st == 0) jfail(c, e->line, "range() step must not be zero");
            jv *l = mk(c, V_LIST);
            for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) {
                if (l->n > 100000) jfail(c, e->line, "range() too long");
                push_item(c, l, NULL, mk_int(c, i));
            }
            return l;
        }
        if (!strcmp(name, "namespace") || !strcmp(name, "dict")) {
            jv *d = mk(c, name[0] == 'n' ? V_NS : V_DICT);
            if (a.npos) {
                if (a.pos[0]->t != V_DICT && a.pos[0]->t != V_NS) jfail(c, e->line, "%s() takes keyword arguments or a dict", name);
                for (size_t i = 0; i < a.pos[0]->n; i++) dict_set(c, d, a.pos[0]->keys[i], a.pos[0]->items[i]);
            }
            for (size_t i = 0; i < a.nkw; i++) dict_set(c, d, mk_str(c, a.kwn[i]), a.kwv[i]);
            return d;
        }
        if (!strcmp(name, "strftime_now")) {
            jv *fmt = arg(&a, 0, "format");
            if (!fmt || fmt->t != V_STR) jfail(c, e->line, "strftime_now() needs a format string");
            char buf[256];
            time_t now = time(NULL);
            struct tm tmv;
            localtime_r(&now, &tmv);
            size_t n = strftime(buf, sizeof buf, fmt->s, &tmv);
            return mk_strn(c, buf, n);
        }
        jfail(c, e->line, "'%s' is undefined (calling it is not supported)", name);
    }
    jv *fn = eval(c, fe);
    if (fn->t != V_FN) jfail(c, e->line, "a %s is not callable", type_name(fn));
    eval_args(c, e, 0, &a);
    /* rename positional arguments for call_method's arg() lookups */
    return call_method(c, fn, &a, e->line);
}

static int do_test(jctx *c, const char *t, jv *v, jargs *a, int line) {
    jv *x = a->npos ? a->pos[0] : NULL;
    if (!strcmp(t, "defined")) return v->t != V_UNDEF;
    if (!strcmp(t, "undefined")) return v->t == V_UNDEF;
    if (!strcmp(t, "none")) return v->t == V_NONE;
    if (!strcmp(t, "string")) return v->t == V_STR;
    if (!strcmp(t, "number")) return v->t == V_INT || v->t == V_FLOAT;
    if (!strcmp(t, "integer")) return v->t == V_INT;
    if (!strcmp(t, "float")) return v->t == V_FLOAT;
    if (!strcmp(t, "boolean")) return v->t == V_BOOL;
    if (!strcmp(t, "true")) return v->t == V_BOOL && v->i;
    if (!strcmp(t, "false")) return v->t == V_BOOL && !v->i;
    if (!strcmp(t, "mapping")) return v->t == V_DICT;
    if (!strcmp(t, "sequence")) return v->t == V_LIST || v->t == V_STR || v->t == V_DICT;
    if (!strcmp(t, "iterable")) return v->t == V_LIST || v->t == V_STR || v->t == V_DICT || v->t == V_UNDEF;
    if (!strcmp(t, "callable")) return v->t == V_FN;
    if (!strcmp(t, "even") || !strcmp(t, "odd")) {
        if (v->t != V_INT) jfail(c, line, "test '%s' needs an integer", t);
        return (int)((v->i % 2 + 2) % 2) == (t[0] == 'o');
    }
    if (!strcmp(t, "divisibleby")) {
        if (!x || x->t != V_INT || !x->i || v->t != V_INT) jfail(c, line, "divisibleby needs integers");
        return v->i % x->i == 0;
    }
    if (!x) jfail(c, line, "test '%s' is not supported or needs an argument", t);
    if (!strcmp(t, "equalto") || !strcmp(t, "eq") || !strcmp(t, "==") || !strcmp(t, "sameas")) return veq(v, x);
    if (!strcmp(t, "ne") || !strcmp(t, "!=")) return !veq(v, x);
    if (!strcmp(t, "in")) {
        jv *l = iter_list(c, x, line);
        for (size_t i = 0; i < l->n; i++) if (veq(l->items[i], v)) return 1;
        return 0;
    }
    jfail(c, line, "test '%s' is not supported", t);
}

static jv *do_filter(jctx *c, const char *f, jv *v, jargs *a, int line) {
    jv *a0 = a->npos ? a->pos[0] : NULL;
    if (!strcmp(f, "trim")) {
        jv *chars = arg(a, 0, "chars");
        return strip_str(c, v->t == V_STR ? v : mk_str(c, to_cstr(c, v, NULL)), chars && chars->t == V_STR ? chars->s : NULL, 1, 1);
    }
    if (!strcmp(f, "length") || !strcmp(f, "count")) {
        if (v->t == V_STR) return mk_int(c, (int64_t)cp_count(v->s, v->n));
        if (v->t == V_LIST || v->t == V_DICT || v->t == V_NS) return mk_int(c, (int64_t)v->n);
        if (v->t == V_UNDEF) return mk_int(c, 0);
        jfail(c, line, "object of type %s has no length", type_name(v));
    }
    if (!strcmp(f, "tojson")) {
        jv *ind = arg(a, 0, "indent"), *sk = arg(a, 3, "sort_keys"), *ea = arg(a, 1, "ensure_ascii"), *sep = arg(a, 2, "separators");
        if ((ea && truthy(ea)) || (sep && sep->t != V_NONE)) jfail(c, line, "tojson: ensure_ascii/separators are not supported");
        st_strbuf *b = tmp_new(c);
        to_json(c, b, v, ind && ind->t == V_INT ? (int)ind->i : -1, 0, sk && truthy(sk), line);
        jv *r = mk_strn(c, b->data ? b->data : "", b->len);
        tmp_done(c, b);
        return r;
    }
    if (!strcmp(f, "upper") || !strcmp(f, "lower") || !strcmp(f, "title") || !strcmp(f, "capitalize")) {
        jv *s = v->t == V_STR ? v : mk_str(c, to_cstr(c, v, NULL));
        return case_str(c, s, f[0] == 'u' ? 0 : f[0] == 'l' ? 1 : f[0] == 't' ? 2 : 3);
    }
    if (!strcmp(f, "default") || !strcmp(f, "d")) {
        jv *b = arg(a, 1, "boolean");
        if (v->t == V_UNDEF || (b && truthy(b) && !truthy(v))) return a0 ? a0 : mk_str(c, "");
        return v;
    }
    if (!strcmp(f, "first") || !strcmp(f, "last")) {
        jv *l = iter_list(c, v, line);
        if (!l->n) return mk_undef(c, f);
        return l->items[f[0] == 'f' ? 0 : l->n - 1];
    }
    if (!strcmp(f, "join")) {
        jv *sep = arg(a, 0, "d"), *attr = arg(a, 1, "attribute");
        jv *l = iter_list(c, v, line);
        st_strbuf *o = tmp_new(c);
        for (size_t i = 0; i < l->n; i++) {
            if (i && sep) { size_t n; const char *s = to_cstr(c, sep, &n); st_strbuf_append(o, s, n); }
            jv *it = attr ? index_value(c, l->items[i], attr, line) : l->items[i];
            size_t n;
            const char *s = to_cstr(c, it, &n);
            st_strbuf_append(o, s, n);
        }
        jv *r = mk_strn(c, o->data ? o->data : "", o->len);
        tmp_done(c, o);
        return r;
    }
    if (!strcmp(f, "list")) return iter_list(c, v, line);
    if (!strcmp(f, "items")) {
        if (v->t == V_UNDEF) return mk(c, V_LIST);
        if (v->t != V_DICT) jfail(c, line, "items filter needs a mapping, got %s", type_name(v));
        jargs none = {0};
        return call_method(c, mk_fn(c, "items", v), &none, line);
    }
    if (!strcmp(f, "string")) return mk_str(c, to_cstr(c, v, NULL));
    if (!strcmp(f, "safe") || !strcmp(f, "e") || !strcmp(f, "escape")) {
        if (f[0] != 's') jfail(c, line, "filter '%s' is not supported", f);
        return v;
    }
    if (!strcmp(f, "int")) {
        if (v->t == V_INT) return v;
        if (v->t == V_FLOAT) return mk_int(c, (int64_t)v->f);
        if (v->t == V_BOOL) return mk_int(c, v->i);
        if (v->t == V_STR) { char *end; long long x = strtoll(v->s, &end, 10); return mk_int(c, *end ? 0 : x); }
        return mk_int(c, 0);
    }
    if (!strcmp(f, "float")) {
        if (is_num(v)) return mk_float(c, num(v));
        if (v->t == V_STR) { char *end; double x = strtod(v->s, &end); return mk_float(c, *end ? 0.0 : x); }
        return mk_float(c, 0.0);
    }
    if (!strcmp(f, "abs")) {
        if (v->t == V_INT) return mk_int(c, v->i < 0 ? -v->i : v->i);
        if (v->t == V_FLOAT) return mk_float(c, fabs(v->f));
        jfail(c, line, "abs of a %s", type_name(v));
    }
    if (!strcmp(f, "replace")) {
        jv *s = v->t == V_STR ? v : mk_str(c, to_cstr(c, v, NULL));
        jv *a1 = arg(a, 1, "new"), *cnt = arg(a, 2, "count");
        if (!a0 || !a1) jfail(c, line, "replace needs two arguments");
        return replace_str(c, s, a0, a1, cnt && cnt->t != V_NONE ? to_index(c, cnt, line) : -1);
    }
    if (!strcmp(f, "reverse")) {
        if (v->t == V_STR) return slice_value(c, v, NULL, NULL, mk_int(c, -1), line);
        jv *l = iter_list(c, v, line), *r = mk(c, V_LIST);
        for (size_t i = l->n; i-- > 0;) push_item(c, r, NULL, l->items[i]);
        return r;
    }
    if (!strcmp(f, "selectattr") || !strcmp(f, "rejectattr") || !strcmp(f, "select") || !strcmp(f, "reject")) {
        int attr = f[6] == 'a', keep = f[0] == 's';
        jv *l = iter_list(c, v, line), *r = mk(c, V_LIST);
        size_t ti = attr ? 1 : 0;
        if (attr && (!a0 || a0->t != V_STR)) jfail(c, line, "%s needs an attribute name", f);
        jv *test = ti < a->npos ? a->pos[ti] : NULL;
        jargs targs = {a->pos + ti + 1, a->npos > ti + 1 ? a->npos - ti - 1 : 0, NULL, NULL, 0};
        for (size_t i = 0; i < l->n; i++) {
            jv *x = attr ? getattr_v(c, l->items[i], a0->s, line) : l->items[i];
            int ok = test ? do_test(c, to_cstr(c, test, NULL), x, &targs, line) : truthy(x);
            if (ok == keep) push_item(c, r, NULL, l->items[i]);
        }
        return r;
    }
    if (!strcmp(f, "map")) {
        jv *attr = arg(a, 99, "attribute"), *dflt = arg(a, 99, "default");
        jv *l = iter_list(c, v, line), *r = mk(c, V_LIST);
        for (size_t i = 0; i < l->n; i++) {
            jv *x;
            if (attr) {
                x = getattr_v(c, l->items[i], to_cstr(c, attr, NULL), line);
                if (x->t == V_UNDEF && dflt) x = dflt;
            } else {
                if (!a0 || a0->t != V_STR) jfail(c, line, "map needs attribute= or a filter name");
                jargs rest = {a->pos + 1, a->npos - 1, a->kwn, a->kwv, a->nkw};
                x = do_filter(c, a0->s, l->items[i], &rest, line);
            }
            push_item(c, r, NULL, x);
        }
        return r;
    }
    if (!strcmp(f, "unique")) {
        jv *l = iter_list(c, v, line), *r = mk(c, V_LIST);
        for (size_t i = 0; i < l->n; i++) {
            int seen = 0;
            for (size_t j = 0; j < r->n && !seen; j++) seen = veq(r->items[j], l->items[i]);
            if (!seen) push_item(c, r, NULL, l->items[i]);
        }
        return r;
    }
    if (!strcmp(f, "indent")) {
        jv *w = arg(a, 0, "width"), *first = arg(a, 1, "first"), *blank = arg(a, 2, "blank");
        st_strbuf *pad = tmp_new(c), *o = tmp_new(c);
        if (w && w->t == V_STR) st_strbuf_append(pad, w->s, w->n);
        else for (int64_t i = 0; i < (w ? to_index(c, w, line) : 4); i++) st_strbuf_append(pad, " ", 1);
        size_t n;
        const char *s = to_cstr(c, v, &n);
        int at_start = 1, fst = 1;
        for (size_t i = 0; i <= n; i++) {
            if (at_start && i < n) {
                int is_blank = s[i] == '\n';
                if ((fst ? first && truthy(first) : 1) && (!is_blank || (blank && truthy(blank))) && pad->len) st_strbuf_append(o, pad->data, pad->len);
                at_start = 0, fst = 0;
            }
            if (i == n) break;
            st_strbuf_append(o, s + i, 1);
            if (s[i] == '\n') at_start = 1, fst = 0;
        }
        jv *r = mk_strn(c, o->data ? o->data : "", o->len);
        tmp_done(c, o), tmp_done(c, pad);
        return r;
    }
    if (!strcmp(f, "round")) {
        jv *p = arg(a, 0, "precision"), *m = arg(a, 1, "method");
        double x = num(v), sc = pow(10, p ? (double)to_index(c, p, line) : 0);
        const char *meth = m ? to_cstr(c, m, NULL) : "common";
        double r = !strcmp(meth, "floor") ? floor(x * sc) / sc : !strcmp(meth, "ceil") ? ceil(x * sc) / sc : round(x * sc) / sc;
        return mk_float(c, r);
    }
    if (!strcmp(f, "sort") || !strcmp(f, "dictsort") || !strcmp(f, "batch") || !strcmp(f, "groupby") || !strcmp(f, "format"))
        jfail(c, line, "filter '%s' is not supported", f);
    jfail(c, line, "filter '%s' is not supported", f);
}

static int compare(jctx *c, const char *op, jv *a, jv *b, int line) {
    int r;
    if (is_num(a) && is_num(b)) { double x = num(a), y = num(b); r = x < y ? -1 : x > y; }
    else if (a->t == V_STR && b->t == V_STR) {
        size_t m = a->n < b->n ? a->n : b->n;
        r = memcmp(a->s, b->s, m);
        if (!r) r = a->n < b->n ? -1 : a->n > b->n;
    } else jfail(c, line, "'%s' not supported between %s and %s", op, type_name(a), type_name(b));
    if (!strcmp(op, "<")) return r < 0;
    if (!strcmp(op, ">")) return r > 0;
    if (!strcmp(op, "<=")) return r <= 0;
    return r >= 0;
}

static jv *binop(jctx *c, const char *op, jv *a, jv *b, int line) {
    if (!strcmp(op, "==")) return mk_bool(c, veq(a, b));
    if (!strcmp(op, "!=")) return mk_bool(c, !veq(a, b));
    if (!strcmp(op, "<") || !strcmp(op, ">") || !strcmp(op, "<=") || !strcmp(op, ">=")) return mk_bool(c, compare(c, op, a, b, line));
    if (!strcmp(op, "in") || !strcmp(op, "not in")) {
        int found = 0;
        if (b->t == V_STR) {
            if (a->t != V_STR) jfail(c, line, "'in <string>' requires a string as left operand");
            found = a->n == 0;
            for (size_t i = 0; !found && i + a->n <= b->n; i++) found = !memcmp(b->s + i, a->s, a->n);
        } else if (b->t == V_LIST) {
            for (size_t i = 0; i < b->n && !found; i++) found = veq(b->items[i], a);
        } else if (b->t == V_DICT || b->t == V_NS) {
            for (size_t i = 0; i < b->n && !found; i++) found = veq(b->keys[i], a);
        } else if (b->t == V_UNDEF) jfail(c, line, "'%s' is undefined", b->s ? b->s : "value");
        else jfail(c, line, "argument of type %s is not iterable", type_name(b));
        return mk_bool(c, op[0] == 'i' ? found : !found);
    }
    if (!strcmp(op, "~")) {
        size_t n1, n2;
        const char *s1 = to_cstr(c, a, &n1), *s2 = to_cstr(c, b, &n2);
        if (n1 + n2 > ST_JINJA_MAX_STR) jfail(c, line, "string longer than 64 MiB");
        char *d = aalloc(c, n1 + n2 + 1);
        memcpy(d, s1, n1), memcpy(d + n1, s2, n2);
        jv *v = mk(c, V_STR);
        v->s = d, v->n = n1 + n2;
        return v;
    }
    if (a->t == V_UNDEF || b->t == V_UNDEF) jfail(c, line, "'%s' is undefined", (a->t == V_UNDEF ? a : b)->s ? (a->t == V_UNDEF ? a : b)->s : "value");
    if (!strcmp(op, "+")) {
        if (a->t == V_STR && b->t == V_STR) return binop(c, "~", a, b, line);
        if (a->t == V_LIST && b->t == V_LIST) {
            jv *l = mk(c, V_LIST);
            if (a->n + b->n > (1u << 20)) jfail(c, line, "list longer than 1M items");
            for (size_t i = 0; i < a->n; i++) push_item(c, l, NULL, a->items[i]);
            for (size_t i = 0; i < b->n; i++) push_item(c, l, NULL, b->items[i]);
            return l;
        }
    }
    if (!strcmp(op, "*") && ((a->t == V_STR && b->t == V_INT) || (a->t == V_INT && b->t == V_STR))) {
        jv *s = a->t == V_STR ? a : b;
        int64_t k = a->t == V_INT ? a->i : b->i;
        st_strbuf *o = tmp_new(c);
        if (k > 0 && s->n && (uint64_t)k * s->n > ST_JINJA_MAX_STR) jfail(c, line, "string longer than 64 MiB");
        for (int64_t i = 0; i < k; i++) st_strbuf_append(o, s->s, s->n);
        jv *r = mk_strn(c, o->data ? o->data : "", o->len);
        tmp_done(c, o);
        return r;
    }
    if (!is_num(a) || !is_num(b)) jfail(c, line, "unsupported operand types for %s: %s and %s", op, type_name(a), type_name(b));
    int ints = a->t != V_FLOAT && b->t != V_FLOAT;
    if (!strcmp(op, "/")) {
        if (num(b) == 0) jfail(c, line, "division by zero");
        return mk_float(c, num(a) / num(b));
    }
    if (ints) {
        int64_t x = a->i, y = b->i;
        switch (op[0]) {
        case '+': return mk_int(c, x + y);
        case '-': return mk_int(c, x - y);
        case '*':
            if (op[1] == '*') {
                if (y < 0) return mk_float(c, pow((double)x, (double)y));
                int64_t r = 1;
                for (int64_t i = 0; i < y && i < 64; i++) r *= x;
                return mk_int(c, r);
            }
            return mk_int(c, x * y);
        case '/': case '%': {
            if (y == 0) jfail(c, line, "division by zero");
            int64_t q = x / y, r = x % y;
            if (r != 0 && ((r < 0) != (y < 0))) q--, r += y;
            return mk_int(c, op[0] == '%' ? r : q);
        }
        }
    }
    double x = num(a), y = num(b);
    switch (op[0]) {
    case '+': return mk_float(c, x + y);
    case '-': return mk_float(c, x - y);
    case '*': return mk_float(c, op[1] == '*' ? pow(x, y) : x * y);
    default:
        if (y == 0) jfail(c, line, "division by zero");
        if (op[0] == '%') { double r = fmod(x, y); if (r != 0 && ((r < 0) != (y < 0))) r += y; return mk_float(c, r); }
        return mk_float(c, floor(x / y));
    }
}

static jv *eval(jctx *c, jnd *e) {
    if (++c->steps > ST_JINJA_MAX_STEPS) jfail(c, e->line, "the template runs too long (over 20M steps)");
    switch (e->k) {
    case E_LIT: return e->val;
    case E_NAME: return lookup(c, e->name);
    case E_ATTR: return getattr_v(c, eval(c, e->a), e->name, e->line);
    case E_ITEM: return index_value(c, eval(c, e->a), eval(c, e->b), e->line);
    case E_SLICE: {
        jv *o = eval(c, e->a);
        return slice_value(c, o, e->b ? eval(c, e->b) : NULL, e->c ? eval(c, e->c) : NULL, e->d ? eval(c, e->d) : NULL, e->line);
    }
    case E_CALL: return call_value(c, e);
    case E_FILTER: {
        jargs a;
        jv *v = eval(c, e->a);
        eval_args(c, e, 0, &a);
        return do_filter(c, e->name, v, &a, e->line);
    }
    case E_TEST: {
        jargs a;
        jv *v = eval(c, e->a);
        eval_args(c, e, 0, &a);
        return mk_bool(c, do_test(c, e->name, v, &a, e->line) != e->neg);
    }
    case E_NOT: return mk_bool(c, !truthy(eval(c, e->a)));
    case E_NEG: case E_POS: {
        jv *v = eval(c, e->a);
        if (!is_num(v)) jfail(c, e->line, "bad operand type for unary %s: %s", e->k == E_NEG ? "-" : "+", type_name(v));
        if (e->k == E_POS) return v;
        return v->t == V_FLOAT ? mk_float(c, -v->f) : mk_int(c, -v->i);
    }
    case E_BIN: return binop(c, e->op, eval(c, e->a), eval(c, e->b), e->line);
    case E_AND: { jv *a = eval(c, e->a); return truthy(a) ? eval(c, e->b) : a; }
    case E_OR: { jv *a = eval(c, e->a); return truthy(a) ? a : eval(c, e->b); }
    case E_COND:
        if (truthy(eval(c, e->a))) return eval(c, e->b);
        return e->c ? eval(c, e->c) : mk_undef(c, "conditional");
    case E_LIST: case E_TUPLE: {
        jv *l = mk(c, V_LIST);
        for (size_t i = 0; i < e->nk; i++) push_item(c, l, NULL, eval(c, e->kids[i]));
        return l;
    }
    case E_DICT: {
        jv *d = mk(c, V_DICT);
        for (size_t i = 0; i < e->nk; i++) dict_set(c, d, eval(c, e->kids[i]), eval(c, e->kids2[i]));
        return d;
    }
    default: jfail(c, e->line, "internal: bad expression node");
    }
}

static void out_value(jctx *c, jv *v) { py_str(c, c->out, v); }

static void exec_for(jctx *c, jnd *n) {
    jv *seq = iter_list(c, eval(c, n->b), n->line);
    /* loop filter first: loop.length counts the kept items */
    jv *items = seq;
    if (n->c) {
        items = mk(c, V_LIST);
        for (size_t i = 0; i < seq->n; i++) {
            push_frame(c);
            assign(c, n->a, seq->items[i], n->line);
            if (truthy(eval(c, n->c))) push_item(c, items, NULL, seq->items[i]);
            c->nframes--;
        }
    }
    if (!items->n) { if (n->d) exec_body(c, n->d); return; }
    for (size_t i = 0; i < items->n; i++) {
        push_frame(c);
        jv *loop = mk(c, V_DICT), *f = c->frames[c->nframes - 1];
        int64_t len = (int64_t)items->n, k = (int64_t)i;
        dict_set(c, loop, mk_str(c, "index"), mk_int(c, k + 1));
        dict_set(c, loop, mk_str(c, "index0"), mk_int(c, k));
        dict_set(c, loop, mk_str(c, "revindex"), mk_int(c, len - k));
        dict_set(c, loop, mk_str(c, "revindex0"), mk_int(c, len - k - 1));
        dict_set(c, loop, mk_str(c, "first"), mk_bool(c, k == 0));
        dict_set(c, loop, mk_str(c, "last"), mk_bool(c, k == len - 1));
        dict_set(c, loop, mk_str(c, "length"), mk_int(c, len));
        dict_set(c, loop, mk_str(c, "depth"), mk_int(c, 1));
        dict_set(c, loop, mk_str(c, "depth0"), mk_int(c, 0));
        dict_set(c, loop, mk_str(c, "previtem"), k > 0 ? items->items[i - 1] : mk_undef(c, "previtem"));
        dict_set(c, loop, mk_str(c, "nextitem"), k < len - 1 ? items->items[i + 1] : mk_undef(c, "nextitem"));
        dict_set(c, f, mk_str(c, "loop"), loop);
        assign(c, n->a, items->items[i], n->line);
        exec_body(c, n->kids2[0]);
        c->nframes--;
        if (c->loop_ctl == 1) { c->loop_ctl = 0; break; }
        c->loop_ctl = 0;
    }
}

static void exec_node(jctx *c, jnd *n) {
    switch (n->k) {
    case N_TEXT: st_strbuf_append(c->out, n->val->s, n->val->n); return;
    case N_OUT: out_value(c, eval(c, n->a)); return;
    case N_BODY: exec_body(c, n); return;
    case N_IF:
        for (size_t i = 0; i < n->nk; i++)
            if (truthy(eval(c, n->kids[i]))) { exec_body(c, n->kids2[i]); return; }
        if (n->a) exec_body(c, n->a);
        return;
    case N_FOR: exec_for(c, n); return;
    case N_SET: assign(c, n->a, eval(c, n->b), n->line); return;
    case N_SETBLOCK: {
        st_strbuf *saved = c->out, *tmp = tmp_new(c);
        c->out = tmp;
        exec_body(c, n->b);
        c->out = saved;
        jv *v = mk_strn(c, tmp->data ? tmp->data : "", tmp->len);
        tmp_done(c, tmp);
        assign(c, n->a, v, n->line);
        return;
    }
    case N_BREAK: c->loop_ctl = 1; return;
    case N_CONTINUE: c->loop_ctl = 2; return;
    case N_GEN: exec_body(c, n->a); return;
    default: jfail(c, n->line, "internal: bad statement node");
    }
}

static void exec_body(jctx *c, jnd *b) {
    for (size_t i = 0; i < b->nk && !c->loop_ctl; i++) {
        if (c->out->failed) { st_fail(ST_ENOMEM, "out of memory rendering a template"); longjmp(c->jb, 1); }
        if (c->out->len > ST_JINJA_MAX_STR) jfail(c, b->kids[i]->line, "output larger than 64 MiB");
        if (++c->steps > ST_JINJA_MAX_STEPS) jfail(c, b->kids[i]->line, "the template runs too long (over 20M steps)");
        exec_node(c, b->kids[i]);
    }
}

/* Newlines as Jinja's lexer sees them: \r\n and \r become \n, and one trailing newline is dropped. */
static char *normalize_source(const char *src, size_t *n) {
    size_t len = strlen(src);
    char *s = malloc(len + 1);
    if (!s) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') { s[k++] = '\n'; if (i + 1 < len && src[i + 1] == '\n') i++; }
        else s[k++] = src[i];
    }
    if (k && s[k - 1] == '\n') k--;
    s[k] = 0;
    *n = k;
    return s;
}

/* transformers copies reasoning under "thinking" and "reasoning_content" (first of reasoning_content,
 * thinking, reasoning that is set): {"thinking": r, **message, "reasoning_content": r}. */
static jv *alias_reasoning(jctx *c, jv *m) {
    if (m->t != V_DICT) return m;
    static const char *const fields[] = {"reasoning_content", "thinking", "reasoning"};
    jv *r = NULL;
    for (int i = 0; i < 3 && !r; i++) { jv *x = dict_get(m, fields[i]); if (x && x->t != V_NONE) r = x; }
    if (!r) return m;
    jv *d = mk(c, V_DICT);
    dict_set(c, d, mk_str(c, "thinking"), r);
    for (size_t i = 0; i < m->n; i++) dict_set(c, d, m->keys[i], m->items[i]);
    dict_set(c, d, mk_str(c, "reasoning_content"), r);
    return d;
}

static void render(jctx *c, const char *src, size_t n, const st_json *messages, const st_chat_opts *opts) {
    lex(c, src, n);
    jnd *root = parse_body(c, NULL, NULL);
    c->globals = mk(c, V_DICT);
    jv *msgs = messages ? from_json(c, messages) : mk(c, V_LIST);
    if (msgs->t != V_LIST) jfail(c, 0, "messages must be a list");
    for (size_t i = 0; i < msgs->n; i++) msgs->items[i] = alias_reasoning(c, msgs->items[i]);
    dict_set(c, c->globals, mk_str(c, "messages"), msgs);
    dict_set(c, c->globals, mk_str(c, "tools"), mk(c, V_NONE));
    dict_set(c, c->globals, mk_str(c, "documents"), mk(c, V_NONE));
    dict_set(c, c->globals, mk_str(c, "add_generation_prompt"), mk_bool(c, opts && opts->add_generation_prompt));
    if (opts && opts->bos_token) dict_set(c, c->globals, mk_str(c, "bos_token"), mk_str(c, opts->bos_token));
    if (opts && opts->eos_token) dict_set(c, c->globals, mk_str(c, "eos_token"), mk_str(c, opts->eos_token));
    if (opts && opts->extra && opts->extra->type == ST_JSON_OBJECT)
        for (size_t i = 0; i < opts->extra->count; i++)
            dict_set(c, c->globals, mk_str(c, opts->extra->keys[i]), from_json(c, opts->extra->items[i]));
    push_frame(c);
    exec_body(c, root);
    if (c->out->failed) jfail(c, 0, "out of memory");
}

/* The only setjmp: a failure anywhere below longjmps here with the message set. */
static int render_guarded(jctx *c, const char *src, size_t n, const st_json *messages, const st_chat_opts *opts) {
    if (setjmp(c->jb) != 0) return ST_EINVAL;
    render(c, src, n, messages, opts);
    return 0;
}

int st_chat_render(const char *template_src, const st_json *messages, const st_chat_opts *opts, char **out) {
    *out = NULL;
    jctx *c = calloc(1, sizeof *c);
    st_strbuf buf = {0};
    size_t n = 0;
    char *src = normalize_source(template_src ? template_src : "", &n);
    if (!c || !src) { free(c); free(src); return st_fail(ST_ENOMEM, "out of memory"); }
    c->name = "chat template";
    c->out = &buf;
    int rc = render_guarded(c, src, n, messages, opts);
    while (c->ntmp > 0) st_strbuf_free(&c->tmps[--c->ntmp]);
    while (c->arena) { blk *b = c->arena->next; free(c->arena); c->arena = b; }
    free(c);
    free(src);
    if (rc < 0) { st_strbuf_free(&buf); return rc; }
    if (!buf.data) { buf.data = malloc(1); if (!buf.data) return st_fail(ST_ENOMEM, "out of memory"); buf.data[0] = 0; }
    *out = buf.data;
    return 0;
}
