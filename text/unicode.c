/* unicode.c — UTF-8 coding, category lookup and the four normalization forms over the generated tables. */
#include "text/unicode.h"

#include "common/error.h"

#include <stdlib.h>
#include <string.h>

int st_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (len == 0 || c > 0xF4 || (size_t)len > n) { *cp = 0xFFFD; return 1; }
    uint32_t v = c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFD; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10FFFF)) || (v >= 0xD800 && v <= 0xDFFF)) {
        *cp = 0xFFFD;
        return 1;
    }
    *cp = v;
    return len;
}

int st_utf8_encode(uint32_t cp, char *out) {
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) { o[0] = (unsigned char)cp; return 1; }
    if (cp < 0x800) { o[0] = 0xC0 | (cp >> 6); o[1] = 0x80 | (cp & 63); return 2; }
    if (cp < 0x10000) {
        o[0] = 0xE0 | (cp >> 12); o[1] = 0x80 | ((cp >> 6) & 63); o[2] = 0x80 | (cp & 63);
        return 3;
    }
    o[0] = 0xF0 | (cp >> 18); o[1] = 0x80 | ((cp >> 12) & 63); o[2] = 0x80 | ((cp >> 6) & 63); o[3] = 0x80 | (cp & 63);
    return 4;
}

int st_utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (u[i] < 0x80) { i++; continue; }
        int l = st_utf8_decode(u + i, n - i, &cp);
        if (cp == 0xFFFD && l == 1) return 0;
        i += (size_t)l;
    }
    return 1;
}

static int range_lookup(const uint32_t (*r)[3], unsigned n, uint32_t cp, int dflt) {
    unsigned lo = 0, hi = n;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return (int)r[mid][2];
    }
    return dflt;
}

int st_uc_category(uint32_t cp) { return range_lookup(st_uc_cat_ranges, st_uc_cat_ranges_n, cp, ST_UC_C); }
int st_uc_ccc(uint32_t cp) { return cp < 0x300 ? 0 : range_lookup(st_uc_ccc_ranges, st_uc_ccc_ranges_n, cp, 0); }

/* Hangul syllable constants (Unicode ch. 3.12). */
enum { SBASE = 0xAC00, LBASE = 0x1100, VBASE = 0x1161, TBASE = 0x11A7, LCOUNT = 19, VCOUNT = 21, TCOUNT = 28,
       NCOUNT = VCOUNT * TCOUNT, SCOUNT = LCOUNT * NCOUNT };

typedef struct { uint32_t *v; size_t n, cap; } cpbuf;

static int cp_push(cpbuf *b, uint32_t cp) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        uint32_t *v = realloc(b->v, cap * sizeof *v);
        if (!v) return -1;
        b->v = v, b->cap = cap;
    }
    b->v[b->n++] = cp;
    return 0;
}

static const uint32_t *decomp_of(uint32_t cp, int compat, unsigned *len) {
    unsigned lo = 0, hi = st_uc_decomp_n;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (cp < st_uc_decomp[mid][0]) hi = mid;
        else if (cp > st_uc_decomp[mid][0]) lo = mid + 1;
        else {
            const uint32_t *e = st_uc_decomp[mid];
            *len = compat ? e[4] : e[2];
            return st_uc_decomp_pool + (compat ? e[3] : e[1]);
        }
    }
    return NULL;
}

static uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= LBASE && a < LBASE + LCOUNT && b >= VBASE && b < VBASE + VCOUNT)
        return SBASE + ((a - LBASE) * VCOUNT + (b - VBASE)) * TCOUNT;
    if (a >= SBASE && a < SBASE + SCOUNT && (a - SBASE) % TCOUNT == 0 && b > TBASE && b < TBASE + TCOUNT)
        return a + (b - TBASE);
    unsigned lo = 0, hi = st_uc_comp_n;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        const uint32_t *e = st_uc_comp[mid];
        if (a < e[0] || (a == e[0] && b < e[1])) hi = mid;
        else if (a > e[0] || b > e[1]) lo = mid + 1;
        else return e[2];
    }
    return 0;
}

static int decompose_into(cpbuf *b, uint32_t cp, int compat) {
    if (cp >= SBASE && cp < SBASE + SCOUNT) {
        uint32_t s = cp - SBASE;
        if (cp_push(b, LBASE + s / NCOUNT) || cp_push(b, VBASE + (s % NCOUNT) / TCOUNT)) return -1;
        if (s % TCOUNT && cp_push(b, TBASE + s % TCOUNT)) return -1;
        return 0;
    }
    unsigned len = 0;
    const uint32_t *d = cp < 0xC0 && !compat ? NULL : decomp_of(cp, compat, &len);
    if (!d) return cp_push(b, cp);
    for (unsigned i = 0; i < len; i++)
        if (cp_push(b, d[i])) return -1;
    return 0;
}

/* Canonical ordering: a stable sort of each run of non-starters by combining class. */
static void reorder(cpbuf *b) {
    for (size_t i = 1; i < b->n; i++) {
        int c = st_uc_ccc(b->v[i]);
        if (!c) continue;
        size_t j = i;
        uint32_t v = b->v[i];
        while (j > 0 && st_uc_ccc(b->v[j - 1]) > c) { b->v[j] = b->v[j - 1]; j--; }
        b->v[j] = v;
    }
}

static void compose(cpbuf *b) {
    if (!b->n) return;
    size_t starter = 0, out = 1;
    int starter_ok = st_uc_ccc(b->v[0]) == 0;
    int last_ccc = starter_ok ? 0 : 256;
    for (size_t i = 1; i < b->n; i++) {
        uint32_t c = b->v[i];
        int cc = st_uc_ccc(c);
        uint32_t comp = 0;
        if (starter_ok && (last_ccc < cc || (last_ccc == 0 && out == starter + 1)))
            comp = compose_pair(b->v[starter], c);
        if (comp) { b->v[starter] = comp; continue; }
        if (cc == 0) { starter = out; starter_ok = 1; last_ccc = 0; }
        else last_ccc = cc;
        b->v[out++] = c;
    }
    b->n = out;
}

int st_uc_normalize(int form, const char *s, size_t n, char **out, size_t *out_len) {
    int ascii = 1;
    for (size_t i = 0; i < n && ascii; i++) ascii = (unsigned char)s[i] < 0x80;
    if (ascii) { /* ASCII is invariant under all four forms */
        char *o = malloc(n + 1);
        if (!o) return st_fail(ST_ENOMEM, "out of memory normalizing text");
        memcpy(o, s, n);
        o[n] = 0;
        *out = o, *out_len = n;
        return 0;
    }
    int compat = form == ST_NORM_NFKC || form == ST_NORM_NFKD;
    cpbuf b = {0};
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += (size_t)st_utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (decompose_into(&b, cp, compat)) { free(b.v); return st_fail(ST_ENOMEM, "out of memory normalizing text"); }
    }
    reorder(&b);
    if (form == ST_NORM_NFC || form == ST_NORM_NFKC) compose(&b);
    char *o = malloc(b.n * 4 + 1);
    if (!o) { free(b.v); return st_fail(ST_ENOMEM, "out of memory normalizing text"); }
    size_t k = 0;
    for (size_t i = 0; i < b.n; i++) k += (size_t)st_utf8_encode(b.v[i], o + k);
    o[k] = 0;
    free(b.v);
    *out = o, *out_len = k;
    return 0;
}
