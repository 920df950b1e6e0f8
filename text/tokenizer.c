/* tokenizer.c — the encode and decode pipelines of Hugging Face `tokenizers`, over st_tokenizer:
 *   added tokens (non-normalized) split out of the raw text -> normalizer -> added tokens (normalized)
 *   -> pre-tokenizers -> BPE per piece -> post-processor's special tokens;
 *   decode: ids -> token strings (special ones skipped on request) -> decoders. */
#include "text/tok_internal.h"

#include "common/error.h"
#include "text/unicode.h"

#include <stdlib.h>
#include <string.h>

/* ---------- byte-level alphabet (GPT-2's bytes_to_unicode) ---------- */

static uint32_t byte_char(unsigned b) {
    if (b <= 32) return 256 + b;
    if (b >= 127 && b <= 160) return 256 + 33 + (b - 127);
    if (b == 173) return 256 + 67;
    return b;
}

static int char_byte(uint32_t cp) {
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 255 && cp != 173)) return (int)cp;
    if (cp >= 256 && cp <= 288) return (int)(cp - 256);
    if (cp >= 289 && cp <= 322) return (int)(cp - 289 + 127);
    if (cp == 323) return 173;
    return -1;
}

/* ---------- BPE on one piece ---------- */

typedef struct { int32_t id, prev, next, alive; uint32_t start; } sym;
typedef struct { uint32_t rank; int32_t pos, new_id; } merge_ent;

static int merge_get(const st_tokenizer *t, int32_t a, int32_t b, uint32_t *rank, int32_t *id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    for (size_t i = st_merge_slot(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (!t->merge_keys[i]) return 0;
        if (t->merge_keys[i] == key) {
            *rank = (uint32_t)(t->merge_vals[i] >> 32), *id = (int32_t)(uint32_t)t->merge_vals[i];
            return 1;
        }
    }
}

static int ent_less(const merge_ent *a, const merge_ent *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(merge_ent *h, size_t *n, merge_ent e) {
    size_t i = (*n)++;
    h[i] = e;
    while (i > 0 && ent_less(&h[i], &h[(i - 1) / 2])) {
        merge_ent tmp = h[i]; h[i] = h[(i - 1) / 2]; h[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
}

static merge_ent heap_pop(merge_ent *h, size_t *n) {
    merge_ent top = h[0];
    h[0] = h[--(*n)];
    for (size_t i = 0;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && ent_less(&h[l], &h[m])) m = l;
        if (r < *n && ent_less(&h[r], &h[m])) m = r;
        if (m == i) break;
        merge_ent tmp = h[i]; h[i] = h[m]; h[m] = tmp;
        i = m;
    }
    return top;
}

static void add_sym(sym *s, size_t *n, int32_t id, size_t start) {
    s[*n] = (sym){id, (int32_t)*n - 1, (int32_t)*n + 1, 1, (uint32_t)start};
    (*n)++;
}

/* Symbols of a piece: one per character (or its <0xXX> bytes / unk), as BPE::merge_word does. */
static size_t initial_symbols(const st_tokenizer *t, const char *w, size_t len, sym *s) {
    size_t n = 0;
    int32_t unk = -1;
    size_t unk_at = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t cl = (size_t)st_utf8_decode((const unsigned char *)w + i, len - i, &cp);
        int32_t id = st_strmap_get(&t->vocab, t, w + i, cl);
        if (id >= 0) {
            if (unk >= 0) { add_sym(s, &n, unk, unk_at); unk = -1; }
            add_sym(s, &n, id, i);
        } else {
            int all = t->byte_fallback;
            for (size_t k = 0; all && k < cl; k++) all = t->byte_ids[(unsigned char)w[i + k]] >= 0;
            if (all) {
                for (size_t k = 0; k < cl; k++) add_sym(s, &n, t->byte_ids[(unsigned char)w[i + k]], i + k);
            } else if (t->unk_id >= 0) {
                if (unk >= 0 && !t->fuse_unk) add_sym(s, &n, unk, unk_at);
                if (unk < 0 || !t->fuse_unk) unk_at = i;
                unk = t->unk_id;
            }
        }
        i += cl;
    }
    if (unk >= 0) add_sym(s, &n, unk, unk_at);
    if (n) s[n - 1].next = -1;
    return n;
}

static int bpe_piece(const st_tokenizer *t, const char *w, size_t len, const uint32_t *al, st_ids *out) {
    if (!len) return 0;
    if (t->ignore_merges) {
        int32_t id = st_strmap_get(&t->vocab, t, w, len);
        if (id >= 0) { st_ids_push_at(out, id, al ? al[0] : 0); return 0; }
    }
    sym *s = malloc(len * 4 * sizeof *s);
    merge_ent *h = malloc(len * 4 * sizeof *h);
    if (!s || !h) { free(s); free(h); return st_fail(ST_ENOMEM, "out of memory in BPE"); }
    size_t n = initial_symbols(t, w, len, s), hn = 0;
    uint32_t rank;
    int32_t nid;
    for (size_t i = 0; i + 1 < n; i++)
        if (merge_get(t, s[i].id, s[i + 1].id, &rank, &nid)) heap_push(h, &hn, (merge_ent){rank, (int32_t)i, nid});
    while (hn) {
        merge_ent m = heap_pop(h, &hn);
        sym *a = &s[m.pos];
        if (!a->alive || a->next < 0) continue;
        sym *b = &s[a->next];
        uint32_t r2;
        int32_t id2;
        if (!merge_get(t, a->id, b->id, &r2, &id2) || id2 != m.new_id) continue; /* stale entry */
        a->id = m.new_id;
        b->alive = 0;
        a->next = b->next;
        if (a->next >= 0) s[a->next].prev = m.pos;
        if (a->prev >= 0 && merge_get(t, s[a->prev].id, a->id, &rank, &nid))
            heap_push(h, &hn, (merge_ent){rank, a->prev, nid});
        if (a->next >= 0 && merge_get(t, a->id, s[a->next].id, &rank, &nid))
            heap_push(h, &hn, (merge_ent){rank, m.pos, nid});
    }
    for (size_t i = 0; i < n; i++)
        if (s[i].alive) st_ids_push_at(out, s[i].id, al ? al[s[i].start] : 0);
    free(s);
    free(h);
    return out->failed ? st_fail(ST_ENOMEM, "out of memory") : 0;
}

/* ---------- pre-tokenizers ---------- */

typedef struct { uint32_t *cp; uint32_t *off; size_t n; } cps_t; /* code points and their byte offsets */

static int to_cps(const char *s, size_t len, cps_t *c) {
    c->cp = malloc((len + 1) * sizeof *c->cp);
    c->off = malloc((len + 1) * sizeof *c->off);
    if (!c->cp || !c->off) { free(c->cp); free(c->off); return st_fail(ST_ENOMEM, "out of memory"); }
    c->n = 0;
    for (size_t i = 0; i < len;) {
        c->off[c->n] = (uint32_t)i;
        i += (size_t)st_utf8_decode((const unsigned char *)s + i, len - i, &c->cp[c->n]);
        c->n++;
    }
    c->off[c->n] = (uint32_t)len;
    return 0;
}

static int pretok(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                  st_ids *out);

static int bytelevel(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                     st_ids *out) {
    char *buf = malloc(len * 2 + 2);
    uint32_t *bal = al ? malloc((len + 2) * sizeof *bal) : NULL, *mal = al ? malloc((len * 2 + 2) * sizeof *mal) : NULL;
    if (!buf || (al && (!bal || !mal))) { free(buf); free(bal); free(mal); return st_fail(ST_ENOMEM, "out of memory"); }
    const st_pre_step *p = &t->pre[step];
    size_t k = 0;
    if (p->add_prefix_space && s[0] != ' ') { if (bal) bal[k] = al[0]; buf[k++] = ' '; }
    memcpy(buf + k, s, len);
    if (bal) memcpy(bal + k, al, len * sizeof *bal);
    k += len;
    cps_t c = {0};
    int rc = 0;
    if (p->use_regex && (rc = to_cps(buf, k, &c)) < 0) { free(buf); free(bal); free(mal); return rc; }
    size_t nparts = p->use_regex ? c.n : 1;
    char *mapped = malloc(k * 2 + 1);
    if (!mapped) rc = st_fail(ST_ENOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < nparts;) {
        size_t a = 0, b = k, j = nparts;
        if (p->use_regex) {
            j = i + st_pretok_match(PRE_RE_GPT2, c.cp, c.n, i);
            a = c.off[i], b = c.off[j];
        }
        size_t m = 0;
        for (size_t q = a; q < b; q++) {
            int w = st_utf8_encode(byte_char((unsigned char)buf[q]), mapped + m);
            if (mal) for (int r = 0; r < w; r++) mal[m + (size_t)r] = bal[q];
            m += (size_t)w;
        }
        rc = pretok(t, step + 1, mapped, m, mal, first && a == 0, out);
        i = j;
    }
    free(mapped), free(buf), free(c.cp), free(c.off), free(bal), free(mal);
    return rc;
}

static int split_regex(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                       st_ids *out) {
    cps_t c;
    int rc = to_cps(s, len, &c);
    for (size_t i = 0; rc == 0 && i < c.n;) {
        size_t j = i + st_pretok_match(t->pre[step].regex, c.cp, c.n, i);
        rc = pretok(t, step + 1, s + c.off[i], c.off[j] - c.off[i], al ? al + c.off[i] : NULL, first && i == 0, out);
        i = j;
    }
    free(c.cp), free(c.off);
    return rc;
}

/* Splits on a literal delimiter with one of the SplitDelimiterBehavior rules. */
static int split_string(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                        int behavior, const char *d, st_ids *out) {
    size_t dl = strlen(d), start = 0, i = 0;
    int rc = 0;
    while (rc == 0 && i + dl <= len) {
        if (memcmp(s + i, d, dl) != 0) { i++; continue; }
        switch (behavior) {
        case SPLIT_ISOLATED:
        case SPLIT_REMOVED:
            if (i > start) rc = pretok(t, step + 1, s + start, i - start, al ? al + start : NULL, first && start == 0, out);
            if (!rc && behavior == SPLIT_ISOLATED) rc = pretok(t, step + 1, s + i, dl, al ? al + i : NULL, first && i == 0, out);
            start = i + dl;
            break;
        case SPLIT_MERGED_PREV:
            rc = pretok(t, step + 1, s + start, i + dl - start, al ? al + start : NULL, first && start == 0, out);
            start = i + dl;
            break;
        default: /* merged with next */
            if (i > start) rc = pretok(t, step + 1, s + start, i - start, al ? al + start : NULL, first && start == 0, out);
            start = i;
            break;
        }
        i += dl;
    }
    if (!rc && start < len) rc = pretok(t, step + 1, s + start, len - start, al ? al + start : NULL, first && start == 0, out);
    return rc;
}

static int metaspace(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                     st_ids *out) {
    const st_pre_step *p = &t->pre[step];
    size_t rl = strlen(p->str), spaces = 0;
    for (size_t i = 0; i < len; i++) spaces += s[i] == ' ';
    size_t cap = len + (spaces + 1) * rl + 1;
    char *buf = malloc(cap);
    uint32_t *mal = al ? malloc(cap * sizeof *mal) : NULL;
    if (!buf || (al && !mal)) { free(buf); free(mal); return st_fail(ST_ENOMEM, "out of memory"); }
    size_t k = 0;
    int starts = len > 0 && (s[0] == ' ' || (len >= rl && !memcmp(s, p->str, rl)));
    if (!starts && (p->prepend == PREPEND_ALWAYS || (p->prepend == PREPEND_FIRST && first))) {
        memcpy(buf, p->str, rl);
        if (mal) for (size_t r = 0; r < rl; r++) mal[r] = al[0];
        k = rl;
    }
    for (size_t i = 0; i < len; i++) {
        size_t w = s[i] == ' ' ? rl : 1;
        if (s[i] == ' ') memcpy(buf + k, p->str, rl);
        else buf[k] = s[i];
        if (mal) for (size_t r = 0; r < w; r++) mal[k + r] = al[i];
        k += w;
    }
    int rc = p->split ? split_string(t, step, buf, k, mal, first, SPLIT_MERGED_NEXT, p->str, out)
                      : pretok(t, step + 1, buf, k, mal, first, out);
    free(buf);
    free(mal);
    return rc;
}

static int pretok(const st_tokenizer *t, size_t step, const char *s, size_t len, const uint32_t *al, int first,
                  st_ids *out) {
    if (!len) return 0;
    if (step == t->n_pre) return bpe_piece(t, s, len, al, out);
    const st_pre_step *p = &t->pre[step];
    switch (p->kind) {
    case PRE_BYTELEVEL: return bytelevel(t, step, s, len, al, first, out);
    case PRE_SPLIT_REGEX: return split_regex(t, step, s, len, al, first, out);
    case PRE_SPLIT_STRING: return split_string(t, step, s, len, al, first, p->behavior, p->str, out);
    default: return metaspace(t, step, s, len, al, first, out);
    }
}

/* ---------- normalizers ---------- */

static int replace_all(const char *s, size_t n, const char *a, const char *b, char **out, size_t *on) {
    size_t al = strlen(a), bl = strlen(b), cnt = 0;
    for (size_t i = 0; i + al <= n;) {
        if (!memcmp(s + i, a, al)) { cnt++; i += al; } else i++;
    }
    char *o = malloc(n + cnt * bl + 1);
    if (!o) return st_fail(ST_ENOMEM, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (i + al <= n && !memcmp(s + i, a, al)) { memcpy(o + k, b, bl); k += bl; i += al; }
        else o[k++] = s[i++];
    }
    o[k] = 0;
    *out = o, *on = k;
    return 0;
}

int st_tok_normalize(const st_tokenizer *t, const char *s, size_t n, char **out, size_t *on) {
    char *cur = malloc(n + 1);
    if (!cur) return st_fail(ST_ENOMEM, "out of memory");
    memcpy(cur, s, n);
    cur[n] = 0;
    size_t cn = n;
    for (size_t i = 0; i < t->n_norm; i++) {
        const st_norm_step *st = &t->norm[i];
        char *next = NULL;
        size_t nn = 0;
        int rc = 0;
        switch (st->kind) {
        case NORM_NFC: rc = st_uc_normalize(ST_NORM_NFC, cur, cn, &next, &nn); break;
        case NORM_NFD: rc = st_uc_normalize(ST_NORM_NFD, cur, cn, &next, &nn); break;
        case NORM_NFKC: rc = st_uc_normalize(ST_NORM_NFKC, cur, cn, &next, &nn); break;
        case NORM_NFKD: rc = st_uc_normalize(ST_NORM_NFKD, cur, cn, &next, &nn); break;
        case NORM_REPLACE: rc = replace_all(cur, cn, st->a, st->b, &next, &nn); break;
        case NORM_PREPEND:
            if (!cn) continue;
            nn = strlen(st->a) + cn;
            if (!(next = malloc(nn + 1))) rc = st_fail(ST_ENOMEM, "out of memory");
            else { memcpy(next, st->a, nn - cn); memcpy(next + nn - cn, cur, cn + 1); }
            break;
        default: { /* Strip */
            size_t a = 0, b = cn;
            uint32_t cp;
            while (st->left && a < b) {
                int l = st_utf8_decode((const unsigned char *)cur + a, b - a, &cp);
                if (!st_uc_is_space(cp)) break;
                a += (size_t)l;
            }
            while (st->right && b > a) {
                size_t q = b - 1;
                while (q > a && ((unsigned char)cur[q] & 0xC0) == 0x80) q--;
                st_utf8_decode((const unsigned char *)cur + q, b - q, &cp);
                if (!st_uc_is_space(cp)) break;
                b = q;
            }
            nn = b - a;
            if (!(next = malloc(nn + 1))) rc = st_fail(ST_ENOMEM, "out of memory");
            else { memcpy(next, cur + a, nn); next[nn] = 0; }
        }
        }
        free(cur);
        if (rc < 0) return rc;
        cur = next, cn = nn;
    }
    *out = cur, *on = cn;
    return 0;
}

/* Alignment of a Unicode normalization: chunks of the input (a starter and its non-starters) are
 * normalized one by one; when their concatenation is the whole string's normalization (always, but for
 * compositions across starters such as Hangul jamo) each output byte maps to its chunk's start, else the
 * mapping is proportional (monotone either way). */
static int unicode_align(int form, const char *s, size_t n, const char *norm, size_t nn, uint32_t *al) {
    size_t k = 0, i = 0;
    int ok = 1;
    while (i < n && ok) {
        size_t j = i;
        uint32_t cp;
        j += (size_t)st_utf8_decode((const unsigned char *)s + j, n - j, &cp);
        while (j < n) {
            int l = st_utf8_decode((const unsigned char *)s + j, n - j, &cp);
            if (st_uc_ccc(cp) == 0) break;
            j += (size_t)l;
        }
        char *part = NULL;
        size_t pn = 0;
        int rc = st_uc_normalize(form, s + i, j - i, &part, &pn);
        if (rc < 0) return rc;
        if (k + pn > nn || memcmp(norm + k, part, pn)) ok = 0;
        else for (size_t q = 0; q < pn; q++) al[k + q] = (uint32_t)i;
        free(part);
        k += pn;
        i = j;
    }
    if (!ok || k != nn)
        for (size_t q = 0; q < nn; q++) al[q] = (uint32_t)(nn ? q * n / nn : 0);
    al[nn] = (uint32_t)n;
    return 0;
}

int st_tok_normalize_aligned(const st_tokenizer *t, const char *s, size_t n, char **out, size_t *on, uint32_t **align) {
    char *cur = malloc(n + 1);
    uint32_t *al = malloc((n + 1) * sizeof *al);
    if (!cur || !al) { free(cur); free(al); return st_fail(ST_ENOMEM, "out of memory"); }
    memcpy(cur, s, n);
    cur[n] = 0;
    for (size_t i = 0; i <= n; i++) al[i] = (uint32_t)i;
    size_t cn = n;
    st_tokenizer one = *t; /* a view with a single step, to reuse st_tok_normalize */
    for (size_t i = 0; i < t->n_norm; i++) {
        const st_norm_step *st = &t->norm[i];
        one.norm = (st_norm_step *)st, one.n_norm = 1;
        char *next = NULL;
        size_t nn = 0;
        int rc = st_tok_normalize(&one, cur, cn, &next, &nn);
        uint32_t *step = rc == 0 ? malloc((nn + 1) * sizeof *step) : NULL;
        if (rc == 0 && !step) rc = st_fail(ST_ENOMEM, "out of memory");
        if (rc == 0) {
            switch (st->kind) {
            case NORM_PREPEND: {
                size_t pl = nn - cn;
                for (size_t q = 0; q <= nn; q++) step[q] = q < pl ? 0 : (uint32_t)(q - pl);
                break;
            }
            case NORM_REPLACE: {
                size_t al_ = strlen(st->a), bl = strlen(st->b), q = 0;
                for (size_t p = 0; p < cn;) {
                    if (p + al_ <= cn && !memcmp(cur + p, st->a, al_)) {
                        for (size_t r = 0; r < bl; r++) step[q++] = (uint32_t)p;
                        p += al_;
                    } else step[q++] = (uint32_t)p++;
                }
                step[nn] = (uint32_t)cn;
                break;
            }
            case NORM_STRIP: {
                size_t a = 0; /* the kept bytes are cur[a .. a + nn) */
                while (a + nn <= cn && memcmp(cur + a, next, nn)) a++;
                for (size_t q = 0; q <= nn; q++) step[q] = (uint32_t)(a + q);
                break;
            }
            default: {
                int form = st->kind == NORM_NFC ? ST_NORM_NFC : st->kind == NORM_NFD ? ST_NORM_NFD
                         : st->kind == NORM_NFKC ? ST_NORM_NFKC : ST_NORM_NFKD;
                rc = unicode_align(form, cur, cn, next, nn, step);
            }
            }
        }
        if (rc < 0) { free(cur); free(al); free(next); free(step); return rc; }
        for (size_t q = 0; q <= nn; q++) step[q] = al[step[q]];
        free(al), free(cur);
        al = step, cur = next, cn = nn;
    }
    *out = cur, *on = cn, *align = al;
    return 0;
}

/* ---------- added tokens ---------- */

static int is_word_char(uint32_t cp) {
    int c = st_uc_category(cp);
    return c == ST_UC_L || c == ST_UC_N || c == ST_UC_M || c == ST_UC_PC;
}

static uint32_t last_char(const char *s, size_t n) {
    size_t q = n - 1;
    while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
    uint32_t cp;
    st_utf8_decode((const unsigned char *)s + q, n - q, &cp);
    return cp;
}

/* Leftmost-longest match of an added token (of the given normalized class) at or after `from`. */
static const st_added_token *find_added(const st_tokenizer *t, const char *s, size_t n, size_t from, int normalized,
                                        size_t *at) {
    for (size_t i = from; i < n; i++) {
        const st_added_token *best = NULL;
        for (size_t k = 0; k < t->n_added; k++) {
            const st_added_token *a = &t->added[k];
            if (a->normalized != normalized || a->content[0] != s[i] || a->len > n - i) continue;
            if ((!best || a->len > best->len) && !memcmp(s + i, a->content, a->len)) best = a;
        }
        if (best) { *at = i; return best; }
    }
    return NULL;
}

typedef int (*segment_fn)(const st_tokenizer *t, const char *s, size_t n, const uint32_t *al, int first, st_ids *out);

/* AddedVocabulary::find_matches: splits s into added tokens and the text between them. */
static int split_added(const st_tokenizer *t, const char *s, size_t n, const uint32_t *al, int normalized, int first,
                       segment_fn fn, st_ids *out) {
    size_t start_off = 0, from = 0, at;
    const st_added_token *a;
    int rc = 0;
    while (rc == 0 && (a = find_added(t, s, n, from, normalized, &at))) {
        size_t start = at, stop = at + a->len;
        from = stop;
        uint32_t cp;
        if (a->single_word) {
            int start_space = start == 0 || !is_word_char(last_char(s, start));
            int stop_space = stop == n || (st_utf8_decode((const unsigned char *)s + stop, n - stop, &cp), !is_word_char(cp));
            if (!start_space || !stop_space) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t q = ns - 1;
                while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
                st_utf8_decode((const unsigned char *)s + q, ns - q, &cp);
                if (!st_uc_is_space(cp)) break;
                ns = q;
            }
            start = ns > start_off ? ns : start_off;
        }
        if (a->rstrip) {
            while (stop < n) {
                int l = st_utf8_decode((const unsigned char *)s + stop, n - stop, &cp);
                if (!st_uc_is_space(cp)) break;
                stop += (size_t)l;
            }
        }
        if (start_off < start) rc = fn(t, s + start_off, start - start_off, al ? al + start_off : NULL, first && start_off == 0, out);
        st_ids_push_at(out, a->id, al ? al[start] : 0);
        start_off = stop;
        if (from < stop) from = stop;
    }
    if (rc == 0 && start_off < n) rc = fn(t, s + start_off, n - start_off, al ? al + start_off : NULL, first && start_off == 0, out);
    if (rc == 0 && out->failed) rc = st_fail(ST_ENOMEM, "out of memory");
    return rc;
}

static int normalized_segment(const st_tokenizer *t, const char *s, size_t n, const uint32_t *al, int first, st_ids *out) {
    return pretok(t, 0, s, n, al, first, out);
}

static int raw_segment(const st_tokenizer *t, const char *s, size_t n, const uint32_t *al, int first, st_ids *out) {
    char *norm = NULL;
    size_t nn = 0;
    uint32_t *nal = NULL;
    int rc = al ? st_tok_normalize_aligned(t, s, n, &norm, &nn, &nal) : st_tok_normalize(t, s, n, &norm, &nn);
    if (rc < 0) return rc;
    if (nal) for (size_t i = 0; i <= nn; i++) nal[i] = al[nal[i]]; /* normalized byte -> original text offset */
    rc = split_added(t, norm, nn, nal, 1, first, normalized_segment, out);
    free(norm);
    free(nal);
    return rc;
}

int st_tokenizer_encode_offsets(const st_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
                                uint32_t **offsets, size_t *n) {
    *ids = NULL, *n = 0;
    if (offsets) *offsets = NULL;
    if (!st_utf8_valid(text, len)) return st_fail(ST_EINVAL, "text is not valid UTF-8");
    if (len >= UINT32_MAX) return st_fail(ST_EINVAL, "text longer than 4 GiB");
    st_ids out = {0};
    out.track = offsets != NULL;
    uint32_t *al = NULL;
    if (offsets) {
        al = malloc((len + 1) * sizeof *al);
        if (!al) return st_fail(ST_ENOMEM, "out of memory");
        for (size_t i = 0; i <= len; i++) al[i] = (uint32_t)i;
    }
    if (add_special)
        for (size_t i = 0; i < t->n_prefix; i++) st_ids_push_at(&out, t->post_prefix[i], 0);
    int rc = split_added(t, text, len, al, 0, 1, raw_segment, &out);
    if (add_special)
        for (size_t i = 0; i < t->n_suffix; i++) st_ids_push_at(&out, t->post_suffix[i], (uint32_t)len);
    free(al);
    if (rc == 0 && out.failed) rc = st_fail(ST_ENOMEM, "out of memory");
    if (rc < 0) { free(out.v); free(out.o); return rc; }
    *ids = out.v, *n = out.n;
    if (offsets) *offsets = out.o;
    return 0;
}

int st_tokenizer_encode(const st_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
                        size_t *n) {
    return st_tokenizer_encode_offsets(t, text, len, add_special, ids, NULL, n);
}

/* ---------- decode ---------- */

typedef struct { char **s; size_t *len; size_t n; } toks_t;

/* String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD. */
static void utf8_lossy(st_strbuf *b, const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c < 0x80) { st_strbuf_append(b, (const char *)s + i, 1); i++; continue; }
        int need = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2 : c >= 0xF0 && c <= 0xF4 ? 3 : -1;
        size_t k = 1;
        if (need > 0) {
            unsigned lo = 0x80, hi = 0xBF;
            if (c == 0xE0) lo = 0xA0;
            else if (c == 0xED) hi = 0x9F;
            else if (c == 0xF0) lo = 0x90;
            else if (c == 0xF4) hi = 0x8F;
            while ((int)k <= need && i + k < n && s[i + k] >= lo && s[i + k] <= hi) { k++; lo = 0x80, hi = 0xBF; }
            if ((int)k == need + 1) { st_strbuf_append(b, (const char *)s + i, k); i += k; continue; }
        }
        st_strbuf_append(b, "\xEF\xBF\xBD", 3);
        i += k;
    }
}

static int set_tok(toks_t *t, size_t i, st_strbuf *b) {
    if (b->failed) return st_fail(ST_ENOMEM, "out of memory");
    if (!b->data) { b->data = malloc(1); if (!b->data) return st_fail(ST_ENOMEM, "out of memory"); b->data[0] = 0; }
    free(t->s[i]);
    t->s[i] = b->data, t->len[i] = b->len;
    *b = (st_strbuf){0};
    return 0;
}

static int dec_bytelevel(toks_t *t) {
    st_strbuf raw = {0}, out = {0};
    for (size_t i = 0; i < t->n; i++) {
        size_t start = raw.len;
        int ok = 1;
        for (size_t q = 0; q < t->len[i];) {
            uint32_t cp;
            q += (size_t)st_utf8_decode((const unsigned char *)t->s[i] + q, t->len[i] - q, &cp);
            int by = char_byte(cp);
            if (by < 0) { ok = 0; break; }
            char c = (char)by;
            st_strbuf_append(&raw, &c, 1);
        }
        if (!ok) { raw.len = start; st_strbuf_append(&raw, t->s[i], t->len[i]); }
    }
    utf8_lossy(&out, (const unsigned char *)raw.data, raw.len);
    st_strbuf_free(&raw);
    for (size_t i = 1; i < t->n; i++) free(t->s[i]);
    t->n = t->n ? 1 : 0;
    if (!t->n) { st_strbuf_free(&out); return 0; }
    return set_tok(t, 0, &out);
}

/* Appends a copy of s[0..n) as a new token of `o` (capacity grown as needed). */
static int toks_add(toks_t *o, size_t *cap, const char *s, size_t n) {
    if (o->n == *cap) {
        size_t c = *cap ? *cap * 2 : 16;
        char **ns = realloc(o->s, c * sizeof *ns);
        if (!ns) return st_fail(ST_ENOMEM, "out of memory");
        o->s = ns;
        size_t *nl = realloc(o->len, c * sizeof *nl);
        if (!nl) return st_fail(ST_ENOMEM, "out of memory");
        o->len = nl, *cap = c;
    }
    char *d = malloc(n + 1);
    if (!d) return st_fail(ST_ENOMEM, "out of memory");
    memcpy(d, s, n);
    d[n] = 0;
    o->s[o->n] = d, o->len[o->n++] = n;
    return 0;
}

static void toks_free(toks_t *t) {
    for (size_t i = 0; i < t->n; i++) free(t->s[i]);
    free(t->s), free(t->len);
    *t = (toks_t){0};
}

static int byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* ByteFallback: runs of <0xXX> tokens become their UTF-8 string, or one U+FFFD per byte if invalid. */
static int dec_bytefallback(toks_t *t) {
    toks_t o = {0};
    size_t cap = 0;
    st_strbuf bytes = {0};
    int rc = 0;
    for (size_t i = 0; i <= t->n && rc == 0; i++) {
        int byte = i < t->n ? byte_token(t->s[i], t->len[i]) : -1;
        if (byte >= 0) {
            char c = (char)byte;
            st_strbuf_append(&bytes, &c, 1);
            continue;
        }
        if (bytes.len) {
            if (st_utf8_valid(bytes.data, bytes.len)) rc = toks_add(&o, &cap, bytes.data, bytes.len);
            else
                for (size_t k = 0; k < bytes.len && rc == 0; k++) rc = toks_add(&o, &cap, "\xEF\xBF\xBD", 3);
            bytes.len = 0;
        }
        if (i < t->n && rc == 0) rc = toks_add(&o, &cap, t->s[i], t->len[i]);
    }
    st_strbuf_free(&bytes);
    if (rc < 0) { toks_free(&o); return rc; }
    toks_free(t);
    if (!o.s) { /* keep the one slot every toks_t has */
        o.s = calloc(1, sizeof *o.s), o.len = calloc(1, sizeof *o.len);
        if (!o.s || !o.len) { free(o.s); free(o.len); return st_fail(ST_ENOMEM, "out of memory"); }
    }
    *t = o;
    return 0;
}

static int dec_simple(toks_t *t, const st_dec_step *d) {
    for (size_t i = 0; i < t->n; i++) {
        st_strbuf b = {0};
        const char *s = t->s[i];
        size_t n = t->len[i];
        if (d->kind == DEC_METASPACE) {
            size_t rl = strlen(d->a);
            for (size_t q = 0; q < n;) {
                if (q + rl <= n && !memcmp(s + q, d->a, rl)) {
                    if (!(i == 0 && d->prepend != PREPEND_NEVER)) st_strbuf_append(&b, " ", 1);
                    q += rl;
                } else st_strbuf_append(&b, s + q++, 1);
            }
        } else if (d->kind == DEC_REPLACE) {
            size_t al = strlen(d->a);
            for (size_t q = 0; q < n;) {
                if (q + al <= n && !memcmp(s + q, d->a, al)) { st_strbuf_append(&b, d->b, strlen(d->b)); q += al; }
                else st_strbuf_append(&b, s + q++, 1);
            }
        } else { /* Strip: up to start leading and stop trailing characters equal to content */
            size_t cl = strlen(d->a), a = 0, e = n;
            for (int k = 0; k < d->start && cl && a + cl <= e && !memcmp(s + a, d->a, cl); k++) a += cl;
            for (int k = 0; k < d->stop && cl && e >= a + cl && !memcmp(s + e - cl, d->a, cl); k++) e -= cl;
            st_strbuf_append(&b, s + a, e - a);
        }
        if (set_tok(t, i, &b) < 0) return -1;
    }
    return 0;
}

static int dec_fuse(toks_t *t, const char *sep) {
    st_strbuf b = {0};
    for (size_t i = 0; i < t->n; i++) {
        if (i && sep) st_strbuf_append(&b, sep, strlen(sep));
        st_strbuf_append(&b, t->s[i], t->len[i]);
    }
    for (size_t i = 1; i < t->n; i++) free(t->s[i]);
    if (!t->n) t->s[0] = NULL; /* every toks_t has room for one slot */
    t->n = 1;
    return set_tok(t, 0, &b);
}

int st_tokenizer_decode(const st_tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text,
                        size_t *len) {
    *text = NULL;
    if (len) *len = 0;
    toks_t tk = {calloc(n + 1, sizeof(char *)), calloc(n + 1, sizeof(size_t)), 0};
    if (!tk.s || !tk.len) { free(tk.s); free(tk.len); return st_fail(ST_ENOMEM, "out of memory"); }
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->n_ids || !t->tok[id]) continue;
        if (skip_special && t->is_special[id]) continue;
        tk.s[tk.n] = malloc(t->tok_len[id] + 1);
        if (!tk.s[tk.n]) { rc = st_fail(ST_ENOMEM, "out of memory"); break; }
        memcpy(tk.s[tk.n], t->tok[id], t->tok_len[id] + 1);
        tk.len[tk.n++] = t->tok_len[id];
    }
    for (size_t i = 0; rc == 0 && i < t->n_dec; i++) {
        const st_dec_step *d = &t->dec[i];
        switch (d->kind) {
        case DEC_BYTELEVEL: rc = dec_bytelevel(&tk); break;
        case DEC_BYTEFALLBACK: rc = dec_bytefallback(&tk); break;
        case DEC_FUSE: rc = dec_fuse(&tk, NULL); break;
        default: rc = dec_simple(&tk, d); break;
        }
    }
    if (rc == 0) rc = dec_fuse(&tk, t->has_decoder ? NULL : " ");
    if (rc == 0) {
        *text = tk.s[0];
        if (len) *len = tk.len[0];
        tk.s[0] = NULL;
    }
    for (size_t i = 0; i < tk.n; i++) free(tk.s[i]);
    free(tk.s), free(tk.len);
    return rc;
}

size_t st_tokenizer_vocab_size(const st_tokenizer *t) { return t->n_ids; }

int32_t st_tokenizer_token_id(const st_tokenizer *t, const char *token) {
    return st_strmap_get(&t->all, t, token, strlen(token));
}

const char *st_tokenizer_id_token(const st_tokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_ids ? t->tok[id] : NULL;
}

int st_tokenizer_is_special(const st_tokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_ids && t->is_special[id];
}

const char *st_tokenizer_chat_template(const st_tokenizer *t) { return t->chat_template; }
const char *st_tokenizer_bos_token(const st_tokenizer *t) { return t->bos_token; }
const char *st_tokenizer_eos_token(const st_tokenizer *t) { return t->eos_token; }
