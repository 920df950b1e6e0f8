/* tokenizer_load.c — reads tokenizer.json (and tokenizer_config.json) into st_tokenizer.
 *
 * Only the components whose behaviour this module reproduces exactly are accepted; anything else is
 * refused with a message naming the component (e.g. "pre_tokenizer Whitespace is not supported"). */
#include "text/tok_internal.h"

#include "common/error.h"
#include "common/util.h"
#include "text/unicode.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const RE_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *const RE_LLAMA3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *const RE_QWEN2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

void st_ids_push_at(st_ids *a, int32_t id, uint32_t off) {
    if (a->failed) return;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) { a->failed = 1; return; }
        a->v = v;
        if (a->track) {
            uint32_t *o = realloc(a->o, cap * sizeof *o);
            if (!o) { a->failed = 1; return; }
            a->o = o;
        }
        a->cap = cap;
    }
    if (a->track) a->o[a->n] = off;
    a->v[a->n++] = id;
}

void st_ids_push(st_ids *a, int32_t id) { st_ids_push_at(a, id, 0); }

uint32_t st_str_hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static int strmap_init(st_strmap *m, size_t n) {
    size_t cap = 64;
    while (cap < n * 2 + 16) cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    return m->slots ? 0 : st_fail(ST_ENOMEM, "out of memory for the vocabulary");
}

int st_strmap_put(st_strmap *m, const st_tokenizer *t, int32_t id) {
    uint32_t h = st_str_hash(t->tok[id], t->tok_len[id]);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint64_t s = m->slots[i];
        if (!s) { m->slots[i] = ((uint64_t)h << 32) | (uint32_t)(id + 1); return 0; }
        int32_t o = (int32_t)(uint32_t)s - 1;
        if ((uint32_t)(s >> 32) == h && t->tok_len[o] == t->tok_len[id] && !memcmp(t->tok[o], t->tok[id], t->tok_len[id])) {
            m->slots[i] = ((uint64_t)h << 32) | (uint32_t)(id + 1); /* a later entry wins, as in a HashMap */
            return 1;
        }
    }
}

int32_t st_strmap_get(const st_strmap *m, const st_tokenizer *t, const char *s, size_t n) {
    uint32_t h = st_str_hash(s, n);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint64_t v = m->slots[i];
        if (!v) return -1;
        int32_t o = (int32_t)(uint32_t)v - 1;
        if ((uint32_t)(v >> 32) == h && t->tok_len[o] == n && !memcmp(t->tok[o], s, n)) return o;
    }
}

static char *dupstr(const char *s) {
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

static int set_token(st_tokenizer *t, int64_t id, const char *s) {
    if (id < 0 || (size_t)id >= t->n_ids) return st_fail(ST_EFORMAT, "token id %lld out of range", (long long)id);
    if (t->tok[id]) {
        if (strcmp(t->tok[id], s) == 0) return 0;
        return st_fail(ST_EFORMAT, "id %lld is given to both \"%s\" and \"%s\"", (long long)id, t->tok[id], s);
    }
    t->tok[id] = dupstr(s);
    if (!t->tok[id]) return st_fail(ST_ENOMEM, "out of memory");
    t->tok_len[id] = (uint32_t)strlen(s);
    return 0;
}

static const char *type_of(const st_json *o) { return st_json_get_string(o, "type", "?"); }

static int unsupported(const char *what, const char *type) {
    return st_fail(ST_EFORMAT, "%s %s is not supported", what, type);
}

static int flag(const st_json *o, const char *key, int dflt) {
    const st_json *v = st_json_get(o, key);
    return v && v->type == ST_JSON_BOOL ? v->boolean : dflt;
}

static const char *pattern_string(const st_json *o, int *is_regex) {
    const st_json *p = st_json_get(o, "pattern");
    const char *s = p ? st_json_get_string(p, "String", NULL) : NULL;
    *is_regex = 0;
    if (!s && p) { s = st_json_get_string(p, "Regex", NULL); *is_regex = 1; }
    return s;
}

/* Flattens a component and its "Sequence" children (key: normalizers / pretokenizers / decoders /
 * processors) into a callback per leaf. */
typedef int (*leaf_fn)(st_tokenizer *t, const st_json *o);
static int walk(st_tokenizer *t, const st_json *o, const char *children, leaf_fn fn, int depth) {
    if (!o || o->type == ST_JSON_NULL) return 0;
    if (o->type != ST_JSON_OBJECT || depth > 8) return st_fail(ST_EFORMAT, "malformed component");
    if (!strcmp(type_of(o), "Sequence")) {
        const st_json *c = st_json_get(o, children);
        if (!c || c->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "Sequence without \"%s\"", children);
        for (size_t i = 0; i < c->count; i++) {
            int rc = walk(t, c->items[i], children, fn, depth + 1);
            if (rc < 0) return rc;
        }
        return 0;
    }
    return fn(t, o);
}

#define GROW(arr, n)                                                  \
    do {                                                              \
        void *p_ = realloc((arr), ((n) + 1) * sizeof *(arr));         \
        if (!p_) return st_fail(ST_ENOMEM, "out of memory");          \
        (arr) = p_;                                                   \
        memset(&(arr)[n], 0, sizeof *(arr));                          \
    } while (0)

static int norm_leaf(st_tokenizer *t, const st_json *o) {
    const char *ty = type_of(o);
    GROW(t->norm, t->n_norm);
    st_norm_step *s = &t->norm[t->n_norm++]; /* counted at once: st_tokenizer_free releases a half-made step */
    if (!strcmp(ty, "NFC")) s->kind = NORM_NFC;
    else if (!strcmp(ty, "NFD")) s->kind = NORM_NFD;
    else if (!strcmp(ty, "NFKC")) s->kind = NORM_NFKC;
    else if (!strcmp(ty, "NFKD")) s->kind = NORM_NFKD;
    else if (!strcmp(ty, "Prepend")) {
        s->kind = NORM_PREPEND;
        const char *p = st_json_get_string(o, "prepend", NULL);
        if (!p) return st_fail(ST_EFORMAT, "normalizer Prepend without \"prepend\"");
        s->a = dupstr(p);
    } else if (!strcmp(ty, "Replace")) {
        int re;
        const char *p = pattern_string(o, &re), *c = st_json_get_string(o, "content", NULL);
        if (!p || !c) return st_fail(ST_EFORMAT, "normalizer Replace needs a pattern and content");
        if (re || !*p) return unsupported("normalizer Replace with a regex pattern", p);
        s->kind = NORM_REPLACE, s->a = dupstr(p), s->b = dupstr(c);
    } else if (!strcmp(ty, "Strip")) {
        s->kind = NORM_STRIP, s->left = flag(o, "strip_left", 1), s->right = flag(o, "strip_right", 1);
    } else return unsupported("normalizer", ty);
    return 0;
}

static int prepend_scheme(const st_json *o, int *out) {
    const char *ps = st_json_get_string(o, "prepend_scheme", NULL);
    if (!ps) {
        const st_json *aps = st_json_get(o, "add_prefix_space");
        *out = aps && aps->type == ST_JSON_BOOL && !aps->boolean ? PREPEND_NEVER : PREPEND_ALWAYS;
    } else if (!strcmp(ps, "always")) *out = PREPEND_ALWAYS;
    else if (!strcmp(ps, "first")) *out = PREPEND_FIRST;
    else if (!strcmp(ps, "never")) *out = PREPEND_NEVER;
    else return st_fail(ST_EFORMAT, "Metaspace prepend_scheme \"%s\" is not supported", ps);
    return 0;
}

static int pre_leaf(st_tokenizer *t, const st_json *o) {
    const char *ty = type_of(o);
    GROW(t->pre, t->n_pre);
    st_pre_step *s = &t->pre[t->n_pre++]; /* counted at once: st_tokenizer_free releases a half-made step */
    if (!strcmp(ty, "ByteLevel")) {
        s->kind = PRE_BYTELEVEL, s->add_prefix_space = flag(o, "add_prefix_space", 1), s->use_regex = flag(o, "use_regex", 1);
    } else if (!strcmp(ty, "Split")) {
        int re;
        const char *p = pattern_string(o, &re), *b = st_json_get_string(o, "behavior", "Isolated");
        if (!p) return st_fail(ST_EFORMAT, "pre_tokenizer Split without a pattern");
        if (flag(o, "invert", 0)) return unsupported("pre_tokenizer Split with", "invert: true");
        if (re) {
            s->kind = PRE_SPLIT_REGEX;
            if (!strcmp(p, RE_GPT2)) s->regex = PRE_RE_GPT2;
            else if (!strcmp(p, RE_LLAMA3)) s->regex = PRE_RE_LLAMA3;
            else if (!strcmp(p, RE_QWEN2)) s->regex = PRE_RE_QWEN2;
            else return st_fail(ST_EFORMAT, "pre_tokenizer Split regex is not one of the known patterns (GPT-2, Llama-3, Qwen2): %.80s", p);
            if (strcmp(b, "Isolated")) return unsupported("pre_tokenizer Split regex with behavior", b);
        } else {
            if (!*p) return st_fail(ST_EFORMAT, "pre_tokenizer Split with an empty pattern");
            s->kind = PRE_SPLIT_STRING, s->str = dupstr(p);
            if (!strcmp(b, "Isolated")) s->behavior = SPLIT_ISOLATED;
            else if (!strcmp(b, "Removed")) s->behavior = SPLIT_REMOVED;
            else if (!strcmp(b, "MergedWithPrevious")) s->behavior = SPLIT_MERGED_PREV;
            else if (!strcmp(b, "MergedWithNext")) s->behavior = SPLIT_MERGED_NEXT;
            else return unsupported("pre_tokenizer Split with behavior", b);
        }
    } else if (!strcmp(ty, "Metaspace")) {
        const char *r = st_json_get_string(o, "replacement", NULL);
        if (!r || !*r) return st_fail(ST_EFORMAT, "pre_tokenizer Metaspace without a replacement");
        s->kind = PRE_METASPACE, s->str = dupstr(r), s->split = flag(o, "split", 1);
        if (prepend_scheme(o, &s->prepend) < 0) return -1;
    } else return unsupported("pre_tokenizer", ty);
    return 0;
}

static int dec_leaf(st_tokenizer *t, const st_json *o) {
    const char *ty = type_of(o);
    GROW(t->dec, t->n_dec);
    st_dec_step *s = &t->dec[t->n_dec++]; /* counted at once: st_tokenizer_free releases a half-made step */
    if (!strcmp(ty, "ByteLevel")) s->kind = DEC_BYTELEVEL;
    else if (!strcmp(ty, "ByteFallback")) s->kind = DEC_BYTEFALLBACK;
    else if (!strcmp(ty, "Fuse")) s->kind = DEC_FUSE;
    else if (!strcmp(ty, "Metaspace")) {
        const char *r = st_json_get_string(o, "replacement", NULL);
        if (!r || !*r) return st_fail(ST_EFORMAT, "decoder Metaspace without a replacement");
        s->kind = DEC_METASPACE, s->a = dupstr(r);
        if (prepend_scheme(o, &s->prepend) < 0) return -1;
    } else if (!strcmp(ty, "Strip")) {
        const char *c = st_json_get_string(o, "content", NULL);
        if (!c) return st_fail(ST_EFORMAT, "decoder Strip without content");
        s->kind = DEC_STRIP, s->a = dupstr(c);
        s->start = (int)st_json_get_int(o, "start", 0, NULL), s->stop = (int)st_json_get_int(o, "stop", 0, NULL);
    } else if (!strcmp(ty, "Replace")) {
        int re;
        const char *p = pattern_string(o, &re), *c = st_json_get_string(o, "content", NULL);
        if (!p || !c) return st_fail(ST_EFORMAT, "decoder Replace needs a pattern and content");
        if (re || !*p) return unsupported("decoder Replace with a regex pattern", p);
        s->kind = DEC_REPLACE, s->a = dupstr(p), s->b = dupstr(c);
    } else return unsupported("decoder", ty);
    return 0;
}

/* Looks up a special token's ids for TemplateProcessing / Roberta / Bert. */
static int push_post(int32_t **arr, size_t *n, int32_t id) {
    int32_t *p = realloc(*arr, (*n + 1) * sizeof *p);
    if (!p) return st_fail(ST_ENOMEM, "out of memory");
    p[(*n)++] = id;
    *arr = p;
    return 0;
}

static int template_post(st_tokenizer *t, const st_json *o) {
    const st_json *single = st_json_get(o, "single"), *sp = st_json_get(o, "special_tokens");
    if (!single || single->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "TemplateProcessing without \"single\"");
    int seen_seq = 0;
    for (size_t i = 0; i < single->count; i++) {
        const st_json *it = single->items[i], *stok = st_json_get(it, "SpecialToken"), *seq = st_json_get(it, "Sequence");
        if (seq) {
            if (seen_seq) return st_fail(ST_EFORMAT, "TemplateProcessing \"single\" holds the sequence twice");
            seen_seq = 1;
            continue;
        }
        const char *name = stok ? st_json_get_string(stok, "id", NULL) : NULL;
        const st_json *e = name && sp ? st_json_get(sp, name) : NULL, *ids = e ? st_json_get(e, "ids") : NULL;
        if (!ids || ids->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "TemplateProcessing: special token %s has no ids", name ? name : "?");
        for (size_t k = 0; k < ids->count; k++) {
            if (!ids->items[k]->is_integer || ids->items[k]->integer < 0 || ids->items[k]->integer > INT32_MAX)
                return st_fail(ST_EFORMAT, "TemplateProcessing: bad id for %s", name);
            int rc = seen_seq ? push_post(&t->post_suffix, &t->n_suffix, (int32_t)ids->items[k]->integer)
                              : push_post(&t->post_prefix, &t->n_prefix, (int32_t)ids->items[k]->integer);
            if (rc < 0) return rc;
        }
    }
    if (!seen_seq) return st_fail(ST_EFORMAT, "TemplateProcessing \"single\" has no $A");
    return 0;
}

static int post_leaf(st_tokenizer *t, const st_json *o) {
    const char *ty = type_of(o);
    if (!strcmp(ty, "ByteLevel")) return 0; /* offsets only */
    if (!strcmp(ty, "TemplateProcessing")) {
        if (t->n_prefix || t->n_suffix) return unsupported("post_processor", "with two TemplateProcessing steps");
        return template_post(t, o);
    }
    if (!strcmp(ty, "RobertaProcessing") || !strcmp(ty, "BertProcessing")) {
        const st_json *cls = st_json_get(o, "cls"), *sep = st_json_get(o, "sep");
        if (!cls || !sep || cls->type != ST_JSON_ARRAY || sep->type != ST_JSON_ARRAY || cls->count != 2 || sep->count != 2 ||
            !cls->items[1]->is_integer || !sep->items[1]->is_integer)
            return st_fail(ST_EFORMAT, "post_processor %s needs cls and sep pairs", ty);
        if (push_post(&t->post_prefix, &t->n_prefix, (int32_t)cls->items[1]->integer) < 0) return -1;
        return push_post(&t->post_suffix, &t->n_suffix, (int32_t)sep->items[1]->integer);
    }
    return unsupported("post_processor", ty);
}

static int merge_put(st_tokenizer *t, int32_t a, int32_t b, uint32_t rank, int32_t id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    for (size_t i = st_merge_slot(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (!t->merge_keys[i] || t->merge_keys[i] == key) {
            t->merge_keys[i] = key;
            t->merge_vals[i] = (uint64_t)rank << 32 | (uint32_t)id;
            return 0;
        }
    }
}

static int load_merges(st_tokenizer *t, const st_json *merges) {
    size_t cap = 64;
    while (cap < merges->count * 2 + 16) cap *= 2;
    t->merge_keys = calloc(cap, sizeof *t->merge_keys);
    t->merge_vals = calloc(cap, sizeof *t->merge_vals);
    t->merge_mask = cap - 1;
    if (!t->merge_keys || !t->merge_vals) return st_fail(ST_ENOMEM, "out of memory for merges");
    st_strbuf cat = {0};
    for (size_t i = 0; i < merges->count; i++) {
        const st_json *m = merges->items[i];
        const char *a = NULL, *b = NULL;
        size_t alen = 0;
        if (m->type == ST_JSON_STRING) {
            const char *sp = strchr(m->string, ' ');
            if (!sp || strchr(sp + 1, ' ')) { st_strbuf_free(&cat); return st_fail(ST_EFORMAT, "merge %zu \"%s\" is not \"a b\"", i, m->string); }
            a = m->string, alen = (size_t)(sp - a), b = sp + 1;
        } else if (m->type == ST_JSON_ARRAY && m->count == 2 && m->items[0]->type == ST_JSON_STRING && m->items[1]->type == ST_JSON_STRING) {
            a = m->items[0]->string, alen = strlen(a), b = m->items[1]->string;
        } else {
            st_strbuf_free(&cat);
            return st_fail(ST_EFORMAT, "merge %zu is neither \"a b\" nor [\"a\", \"b\"]", i);
        }
        cat.len = 0;
        st_strbuf_append(&cat, a, alen);
        size_t blen = strlen(b);
        st_strbuf_append(&cat, b, blen);
        if (cat.failed) { st_strbuf_free(&cat); return st_fail(ST_ENOMEM, "out of memory"); }
        int32_t ia = st_strmap_get(&t->vocab, t, a, alen), ib = st_strmap_get(&t->vocab, t, b, blen);
        int32_t ic = st_strmap_get(&t->vocab, t, cat.data, cat.len);
        if (ia < 0 || ib < 0 || ic < 0) {
            int rc = st_fail(ST_EFORMAT, "merge %zu (%.*s + %s) uses a token missing from the vocabulary", i, (int)alen, a, b);
            st_strbuf_free(&cat);
            return rc;
        }
        merge_put(t, ia, ib, (uint32_t)i, ic);
    }
    st_strbuf_free(&cat);
    return 0;
}

static int load_model(st_tokenizer *t, const st_json *model, const st_json *added) {
    if (!model || model->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "no \"model\"");
    const char *ty = st_json_get_string(model, "type", "BPE");
    if (strcmp(ty, "BPE")) return unsupported("model", ty);
    const st_json *vocab = st_json_get(model, "vocab"), *merges = st_json_get(model, "merges");
    if (!vocab || vocab->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "model has no \"vocab\" object");
    if (!merges || merges->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "model has no \"merges\" array");
    const st_json *dropout = st_json_get(model, "dropout");
    if (dropout && dropout->type != ST_JSON_NULL) return unsupported("model BPE with", "dropout");
    const char *csp = st_json_get_string(model, "continuing_subword_prefix", NULL);
    const char *eows = st_json_get_string(model, "end_of_word_suffix", NULL);
    if ((csp && *csp) || (eows && *eows)) return unsupported("model BPE with", "continuing_subword_prefix/end_of_word_suffix");
    t->byte_fallback = flag(model, "byte_fallback", 0);
    t->fuse_unk = flag(model, "fuse_unk", 0);
    t->ignore_merges = flag(model, "ignore_merges", 0);
    /* size: max id over the vocab and the added tokens */
    int64_t max_id = -1;
    for (size_t i = 0; i < vocab->count; i++) {
        const st_json *v = vocab->items[i];
        if (!v->is_integer || v->integer < 0 || v->integer >= (1LL << 30))
            return st_fail(ST_EFORMAT, "vocab entry \"%s\" has no valid id", vocab->keys[i]);
        if (v->integer > max_id) max_id = v->integer;
    }
    for (size_t i = 0; added && i < added->count; i++) {
        int64_t id = st_json_get_int(added->items[i], "id", -1, NULL);
        if (id < 0 || id >= (1LL << 30)) return st_fail(ST_EFORMAT, "added token %zu has no valid id", i);
        if (id > max_id) max_id = id;
    }
    size_t n_tokens = vocab->count + (added ? added->count : 0);
    if (max_id >= 0 && (uint64_t)max_id > 2 * (uint64_t)n_tokens + 65536)
        return st_fail(ST_EFORMAT, "token ids are far from dense: id %lld for %zu tokens", (long long)max_id, n_tokens);
    t->n_ids = (size_t)(max_id + 1);
    t->tok = calloc(t->n_ids + 1, sizeof *t->tok);
    t->tok_len = calloc(t->n_ids + 1, sizeof *t->tok_len);
    t->is_special = calloc(t->n_ids + 1, 1);
    t->is_added = calloc(t->n_ids + 1, 1);
    if (!t->tok || !t->tok_len || !t->is_special || !t->is_added) return st_fail(ST_ENOMEM, "out of memory");
    if (strmap_init(&t->vocab, vocab->count) < 0) return -1;
    for (size_t i = 0; i < vocab->count; i++) {
        int rc = set_token(t, vocab->items[i]->integer, vocab->keys[i]);
        if (rc < 0) return rc;
        st_strmap_put(&t->vocab, t, (int32_t)vocab->items[i]->integer);
    }
    const char *unk = st_json_get_string(model, "unk_token", NULL);
    t->unk_id = unk ? st_strmap_get(&t->vocab, t, unk, strlen(unk)) : -1;
    if (unk && t->unk_id < 0) return st_fail(ST_EFORMAT, "unk_token \"%s\" is not in the vocabulary", unk);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = st_strmap_get(&t->vocab, t, name, 6);
    }
    return load_merges(t, merges);
}

static int load_added(st_tokenizer *t, const st_json *added) {
    if (!added || added->type == ST_JSON_NULL) return 0;
    if (added->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "\"added_tokens\" is not an array");
    t->added = calloc(added->count + 1, sizeof *t->added);
    if (!t->added) return st_fail(ST_ENOMEM, "out of memory");
    for (size_t i = 0; i < added->count; i++) {
        const st_json *a = added->items[i];
        const char *c = st_json_get_string(a, "content", NULL);
        if (!c || !*c) return st_fail(ST_EFORMAT, "added token %zu has no content", i);
        st_added_token *x = &t->added[t->n_added++];
        x->id = (int32_t)st_json_get_int(a, "id", -1, NULL);
        int rc = set_token(t, x->id, c);
        if (rc < 0) return rc;
        x->content = t->tok[x->id], x->len = t->tok_len[x->id];
        x->single_word = flag(a, "single_word", 0), x->lstrip = flag(a, "lstrip", 0), x->rstrip = flag(a, "rstrip", 0);
        x->special = flag(a, "special", 0), x->normalized = flag(a, "normalized", !x->special);
        t->is_added[x->id] = 1;
        t->is_special[x->id] = (uint8_t)x->special;
    }
    return 0;
}

/* A "normalized" added token is matched, and decoded, as the normalizer's output of its content
 * (e.g. "foo" under a Prepend("▁") normalizer is the token "▁foo"), as tokenizers stores it. */
static int normalize_added(st_tokenizer *t) {
    for (size_t i = 0; t->n_norm && i < t->n_added; i++) {
        st_added_token *a = &t->added[i];
        if (!a->normalized) continue;
        char *s = NULL;
        size_t n = 0;
        int rc = st_tok_normalize(t, a->content, a->len, &s, &n);
        if (rc < 0) return rc;
        if (!n) { free(s); return st_fail(ST_EFORMAT, "added token \"%s\" normalizes to nothing", a->content); }
        free(t->tok[a->id]);
        t->tok[a->id] = s, t->tok_len[a->id] = (uint32_t)n;
        a->content = s, a->len = n;
    }
    return 0;
}

static int load_parts(st_tokenizer *t, const st_json *root) {
    if (root->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "not a JSON object");
    const st_json *added = st_json_get(root, "added_tokens");
    if (added && added->type != ST_JSON_ARRAY && added->type != ST_JSON_NULL) return st_fail(ST_EFORMAT, "\"added_tokens\" is not an array");
    int rc = load_model(t, st_json_get(root, "model"), added && added->type == ST_JSON_ARRAY ? added : NULL);
    if (rc < 0) return rc;
    if ((rc = load_added(t, added)) < 0) return rc;
    if ((rc = walk(t, st_json_get(root, "normalizer"), "normalizers", norm_leaf, 0)) < 0) return st_fail_context(rc, "normalizer");
    if ((rc = normalize_added(t)) < 0) return rc;
    if (strmap_init(&t->all, t->n_ids) < 0) return -1;
    for (size_t i = 0; i < t->n_ids; i++)
        if (t->tok[i]) st_strmap_put(&t->all, t, (int32_t)i);
    if ((rc = walk(t, st_json_get(root, "pre_tokenizer"), "pretokenizers", pre_leaf, 0)) < 0) return rc;
    const st_json *dec = st_json_get(root, "decoder");
    t->has_decoder = dec && dec->type != ST_JSON_NULL;
    if ((rc = walk(t, dec, "decoders", dec_leaf, 0)) < 0) return rc;
    if ((rc = walk(t, st_json_get(root, "post_processor"), "processors", post_leaf, 0)) < 0) return rc;
    const st_json *trunc = st_json_get(root, "truncation"), *pad = st_json_get(root, "padding");
    if (trunc && trunc->type != ST_JSON_NULL) return unsupported("truncation", "(set it to null)");
    if (pad && pad->type != ST_JSON_NULL) return unsupported("padding", "(set it to null)");
    return 0;
}

int st_tokenizer_load_json(const char *name, const char *json, size_t len, st_tokenizer **out) {
    *out = NULL;
    st_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return st_fail(ST_ENOMEM, "out of memory");
    snprintf(t->name, sizeof t->name, "%s", name);
    t->unk_id = -1;
    st_json *root = NULL;
    int rc = st_json_parse(json, len, &root);
    if (rc == 0) rc = load_parts(t, root);
    st_json_free(root);
    if (rc < 0) {
        st_tokenizer_free(t);
        return st_fail_context(rc, "%s", name);
    }
    *out = t;
    return 0;
}

static char *token_string(const st_json *cfg, const char *key) {
    const st_json *v = st_json_get(cfg, key);
    if (v && v->type == ST_JSON_STRING) return dupstr(v->string);
    if (v && v->type == ST_JSON_OBJECT) { /* AddedToken serialized as {"content": ...} */
        const char *c = st_json_get_string(v, "content", NULL);
        return c ? dupstr(c) : NULL;
    }
    return NULL;
}

/* chat_template may be a string or a list of {"name", "template"}; the "default" one is used. */
static int config_template(st_tokenizer *t, const st_json *cfg, const char *path) {
    const st_json *ct = st_json_get(cfg, "chat_template");
    if (!ct || ct->type == ST_JSON_NULL) return 0;
    if (ct->type == ST_JSON_STRING) { t->chat_template = dupstr(ct->string); return 0; }
    if (ct->type == ST_JSON_ARRAY) {
        for (size_t i = 0; i < ct->count; i++) {
            const char *n = st_json_get_string(ct->items[i], "name", NULL), *s = st_json_get_string(ct->items[i], "template", NULL);
            if (n && s && !strcmp(n, "default")) { t->chat_template = dupstr(s); return 0; }
        }
        return 0;
    }
    return st_fail(ST_EFORMAT, "%s: chat_template is neither a string nor a list", path);
}

int st_tokenizer_load(const char *dir, st_tokenizer **out) {
    char path[4096];
    char *data = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = st_read_file(path, &data, &len);
    if (rc < 0) return st_fail(rc, "%s: cannot read (the model directory needs a Hugging Face tokenizer.json)", path);
    rc = st_tokenizer_load_json(path, data, len, out);
    free(data);
    if (rc < 0) return rc;
    st_tokenizer *t = *out;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (st_read_file(path, &data, &len) == 0) {
        st_json *cfg = NULL;
        rc = st_json_parse(data, len, &cfg);
        free(data);
        if (rc < 0) rc = st_fail_context(rc, "%s", path);
        else {
            t->bos_token = token_string(cfg, "bos_token");
            t->eos_token = token_string(cfg, "eos_token");
            rc = config_template(t, cfg, path);
        }
        st_json_free(cfg);
        if (rc < 0) { st_tokenizer_free(t); *out = NULL; return rc; }
    }
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    if (st_read_file(path, &data, &len) == 0) {
        free(t->chat_template);
        t->chat_template = data;
    }
    return 0;
}

void st_tokenizer_free(st_tokenizer *t) {
    if (!t) return;
    for (size_t i = 0; t->tok && i < t->n_ids; i++) free(t->tok[i]);
    free(t->tok), free(t->tok_len), free(t->is_special), free(t->is_added);
    free(t->vocab.slots), free(t->all.slots), free(t->merge_keys), free(t->merge_vals);
    for (size_t i = 0; i < t->n_norm; i++) free(t->norm[i].a), free(t->norm[i].b);
    for (size_t i = 0; i < t->n_pre; i++) free(t->pre[i].str);
    for (size_t i = 0; i < t->n_dec; i++) free(t->dec[i].a), free(t->dec[i].b);
    free(t->norm), free(t->pre), free(t->dec), free(t->post_prefix), free(t->post_suffix), free(t->added);
    free(t->chat_template), free(t->bos_token), free(t->eos_token);
    free(t);
}
