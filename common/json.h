/* json.h — a small, strict JSON reader (DOM) and a growable string builder for writing JSON.
 *
 * Used for config.json, safetensors headers, model index files, JSONL datasets and metrics.
 * The parser never trusts its input: depth is bounded, numbers and strings are validated, and every
 * error names the byte offset. A parsed tree is owned by the caller and freed with st_json_free(). */
#ifndef ST_JSON_H
#define ST_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum { ST_JSON_NULL, ST_JSON_BOOL, ST_JSON_NUMBER, ST_JSON_STRING, ST_JSON_ARRAY, ST_JSON_OBJECT } st_json_type;

typedef struct st_json st_json;
struct st_json {
    st_json_type type;
    int boolean;
    double number;
    int is_integer;        /* number had no fraction/exponent and fits in int64 */
    int64_t integer;       /* valid when is_integer */
    char *string;          /* NUL-terminated (strings may not contain NUL; \u0000 is rejected) */
    size_t count;          /* array or object size */
    st_json **items;       /* array elements / object values */
    char **keys;           /* object keys (same order as in the text) */
};

/* Parses exactly one JSON value (surrounding whitespace allowed). On error returns ST_EFORMAT with
 * "invalid JSON at byte N: ..." (callers add the file name with st_fail_context). */
int st_json_parse(const char *text, size_t len, st_json **out);
void st_json_free(st_json *v);

/* Object member lookup (NULL when absent or `obj` is not an object). */
const st_json *st_json_get(const st_json *obj, const char *key);
/* Typed lookups with a default for absent keys; *ok (if non-NULL) is cleared on a type mismatch. */
int64_t st_json_get_int(const st_json *obj, const char *key, int64_t dflt, int *ok);
double st_json_get_number(const st_json *obj, const char *key, double dflt, int *ok);
const char *st_json_get_string(const st_json *obj, const char *key, const char *dflt);

/* Growable string. Zero-initialize, append, take `.data` (malloc'ed, NUL-terminated) or free it. */
typedef struct {
    char *data;
    size_t len, cap;
    int failed; /* set when an allocation failed; further appends are ignored */
} st_strbuf;

void st_strbuf_printf(st_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void st_strbuf_append(st_strbuf *b, const char *s, size_t n);
/* Appends s as a quoted, escaped JSON string. */
void st_strbuf_json_string(st_strbuf *b, const char *s);
void st_strbuf_free(st_strbuf *b);

#endif
