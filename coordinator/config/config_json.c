/* config_json.c — st_config_to_json: the canonical JSON form of a config (the serialized JobSpec).
 *
 * Walks the key tables (config_keys.h), so every key appears, in table order, nested like the YAML.
 * Doubles are written with the fewest digits that read back to the same value, so dumping, loading
 * the dump and dumping again gives the same bytes. The output is malloc'ed; the caller frees it. */
#include "coordinator/config/config.h"
#include "coordinator/config/config_keys.h"
#include "common/error.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} sbuf;

static void put(sbuf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1) cap *= 2;
        char *nb = realloc(b->buf, cap);
        if (!nb) {
            b->failed = 1;
            return;
        }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = 0;
}

static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }

static void putf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(sbuf *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void put_string(sbuf *b, const char *s) {
    puts_(b, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            char esc[2] = {'\\', (char)ch};
            put(b, esc, 2);
        } else if (ch < 0x20) {
            putf(b, "\\u%04x", ch);
        } else {
            put(b, (const char *)&ch, 1);
        }
    }
    puts_(b, "\"");
}

static void put_double(sbuf *b, double v) {
    if (!isfinite(v)) {
        puts_(b, "null");
        return;
    }
    char tmp[40];
    if (v == floor(v) && fabs(v) < 1e15) { /* whole numbers read best without an exponent: 30, not 3e+01 */
        snprintf(tmp, sizeof tmp, "%.0f", v);
        puts_(b, tmp);
        return;
    }
    for (int digits = 1; digits <= 17; digits++) {
        snprintf(tmp, sizeof tmp, "%.*g", digits, v);
        if (strtod(tmp, NULL) == v) break;
    }
    puts_(b, tmp);
}

static void put_table(sbuf *b, const st_key *table, const char *base);

static void put_value(sbuf *b, const st_key *k, const char *base) {
    const char *p = base + k->off;
    switch (k->kind) {
    case ST_KEY_SECTION: put_table(b, k->sub, p); break;
    case ST_KEY_LIST: {
        int n = *(const int *)(base + k->count_off);
        puts_(b, "[");
        for (int i = 0; i < n; i++) {
            if (i) puts_(b, ", ");
            put_table(b, k->sub, p + (size_t)i * k->size);
        }
        puts_(b, "]");
        break;
    }
    case ST_KEY_I32: putf(b, "%d", *(const int *)p); break;
    case ST_KEY_I64: putf(b, "%" PRId64, *(const int64_t *)p); break;
    case ST_KEY_F64: put_double(b, *(const double *)p); break;
    case ST_KEY_F64_LIST:
        puts_(b, "[");
        for (size_t i = 0; i < k->size; i++) {
            if (i) puts_(b, ", ");
            put_double(b, ((const double *)p)[i]);
        }
        puts_(b, "]");
        break;
    case ST_KEY_BOOL: puts_(b, *(const int *)p ? "true" : "false"); break;
    case ST_KEY_STRING: put_string(b, p); break;
    case ST_KEY_ENUM: {
        int v = *(const int *)p, n = 0;
        while (k->names[n]) n++;
        put_string(b, v >= 0 && v < n ? k->names[v] : "?");
        break;
    }
    case ST_KEY_MODULES: {
        unsigned mask = *(const unsigned *)p;
        int first = 1;
        puts_(b, "[");
        for (int i = 0; st_module_names[i]; i++) {
            if (!(mask & (1u << i))) continue;
            if (!first) puts_(b, ", ");
            put_string(b, st_module_names[i]);
            first = 0;
        }
        puts_(b, "]");
        break;
    }
    case ST_KEY_NAMESET: {
        unsigned mask = *(const unsigned *)p;
        int first = 1;
        puts_(b, "[");
        for (int i = 0; k->names[i]; i++) {
            if (!(mask & (1u << i))) continue;
            if (!first) puts_(b, ", ");
            put_string(b, k->names[i]);
            first = 0;
        }
        puts_(b, "]");
        break;
    }
    case ST_KEY_SIGNAL: put_string(b, st_signal_name(*(const int *)p)); break;
    case ST_KEY_RESUME: {
        const st_config *c = (const st_config *)base;
        put_string(b, c->resume == ST_RESUME_AUTO ? "auto" : c->resume == ST_RESUME_NONE ? "none" : c->resume_path);
        break;
    }
    case ST_KEY_END: break;
    }
}

/* A number key with ST_KEY_UNSET_ZERO whose value is 0 was not given. */
static int unset_zero(const st_key *k, const char *base) {
    const char *p = base + k->off;
    return k->kind == ST_KEY_I64 ? *(const int64_t *)p == 0 : k->kind == ST_KEY_F64 ? *(const double *)p == 0 : 0;
}

static void put_table(sbuf *b, const st_key *table, const char *base) {
    puts_(b, "{");
    int first = 1;
    for (const st_key *k = table; k->name; k++) {
        if ((k->flags & ST_KEY_UNSET_ZERO) && unset_zero(k, base)) continue;
        if (!first) puts_(b, ", ");
        first = 0;
        put_string(b, k->name);
        puts_(b, ": ");
        put_value(b, k, base);
    }
    puts_(b, "}");
}

int st_config_to_json(const st_config *c, char **json_out) {
    if (!c || !json_out) return st_fail(ST_EINVAL, "st_config_to_json: NULL argument");
    sbuf b = {0};
    put_table(&b, st_config_root_keys, (const char *)c);
    if (b.failed) {
        free(b.buf);
        return st_fail(ST_ENOMEM, "out of memory writing the job spec as JSON");
    }
    *json_out = b.buf;
    return 0;
}
