/* tok_internal.h — the tokenizer's internal representation, shared by the loader (tokenizer_load.c),
 * the pipeline (tokenizer.c) and the pre-tokenizer matchers (pretok.c). Not a public interface. */
#ifndef ST_TOK_INTERNAL_H
#define ST_TOK_INTERNAL_H

#include "text/tokenizer.h"

#include <stddef.h>
#include <stdint.h>

/* A growable list of int32 ids. */
typedef struct { int32_t *v; uint32_t *o; size_t n, cap; int failed, track; } st_ids;
void st_ids_push(st_ids *a, int32_t id);
/* Pushes an id with the byte offset (in the encoded text) where its token starts (kept when a->track). */
void st_ids_push_at(st_ids *a, int32_t id, uint32_t off);

/* Normalizer steps, applied in order. */
enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_PREPEND, NORM_REPLACE, NORM_STRIP };
typedef struct { int kind; char *a, *b; int left, right; } st_norm_step;

/* Pre-tokenizer steps, applied in order (each splits the pieces of the previous). */
enum { PRE_BYTELEVEL, PRE_SPLIT_REGEX, PRE_SPLIT_STRING, PRE_METASPACE };
enum { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT };
enum { PRE_RE_GPT2, PRE_RE_LLAMA3, PRE_RE_QWEN2 };
enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };
typedef struct {
    int kind;
    int add_prefix_space, use_regex; /* ByteLevel */
    int regex, behavior;             /* Split */
    char *str;                       /* Split string pattern / Metaspace replacement */
    int prepend, split;              /* Metaspace */
} st_pre_step;

/* Decoder steps. */
enum { DEC_BYTELEVEL, DEC_METASPACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_REPLACE };
typedef struct { int kind; char *a, *b; int start, stop, prepend; } st_dec_step;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int single_word, lstrip, rstrip, normalized, special;
} st_added_token;

/* Open-addressing hash of strings to ids. */
typedef struct { uint64_t *slots; size_t mask; } st_strmap; /* slot: (hash32 << 32) | (id + 1), 0 = empty */

struct st_tokenizer {
    char name[256];
    /* id -> token (model vocab and added tokens), owned */
    char **tok;
    uint32_t *tok_len;
    uint8_t *is_special, *is_added;
    size_t n_ids;
    st_strmap vocab;       /* model vocabulary */
    st_strmap all;         /* model vocabulary and added tokens */
    /* BPE */
    uint64_t *merge_keys;  /* open addressing: key (a << 32 | b) + 1 ... */
    uint64_t *merge_vals;  /* (rank << 32) | new_id */
    size_t merge_mask;
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t unk_id;        /* -1 none */
    int32_t byte_ids[256]; /* <0xXX> tokens for byte_fallback, -1 when absent */
    /* pipeline */
    st_norm_step *norm; size_t n_norm;
    st_pre_step *pre; size_t n_pre;
    st_dec_step *dec; size_t n_dec; int has_decoder;
    int32_t *post_prefix, *post_suffix; size_t n_prefix, n_suffix;
    st_added_token *added; size_t n_added;
    /* tokenizer_config.json */
    char *chat_template, *bos_token, *eos_token;
};

/* strmap over the tokenizer's tok[]/tok_len[] arrays */
uint32_t st_str_hash(const char *s, size_t n);
int st_strmap_put(st_strmap *m, const st_tokenizer *t, int32_t id);
int32_t st_strmap_get(const st_strmap *m, const st_tokenizer *t, const char *s, size_t n);

/* Applies the normalizer steps to s[0..n): a malloc'ed NUL-terminated result. */
int st_tok_normalize(const st_tokenizer *t, const char *s, size_t n, char **out, size_t *on);
/* The same, also mapping each output byte (and the end) to an input byte offset: *align gets on + 1
 * malloc'ed entries. */
int st_tok_normalize_aligned(const st_tokenizer *t, const char *s, size_t n, char **out, size_t *on, uint32_t **align);

/* Finds the end (exclusive, index into cps) of the pre-tokenizer regex match that starts at i; the known
 * patterns always match at least one code point. */
size_t st_pretok_match(int regex, const uint32_t *cps, size_t n, size_t i);

/* The slot of merge key (a << 32 | b) + 1 before masking: a full 64-bit mix (splitmix64's finalizer), so
 * that the low bits a small table keeps depend on both ids (a multiply alone leaves bits < 32
 * independent of a: every merge with the same right id collided). */
static inline size_t st_merge_slot(uint64_t key) {
    uint64_t z = key;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (size_t)(z ^ (z >> 31));
}

#endif
