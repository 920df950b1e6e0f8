/* gguf_internal.h — the GGUF metadata builder shared by gguf.c (model keys) and gguf_vocab.c (tokenizer).
 * A st_gguf_kv owns its byte buffer (free with st_strbuf_free(&kv->b)). */
#ifndef ST_GGUF_INTERNAL_H
#define ST_GGUF_INTERNAL_H

#include <stdint.h>

#include "checkpoints/gguf.h"
#include "common/json.h"

/* GGUF metadata value types. */
enum { GGUF_U8 = 0, GGUF_I32 = 5, GGUF_U32 = 4, GGUF_F32 = 6, GGUF_BOOL = 7, GGUF_STR = 8, GGUF_ARR = 9 };

typedef struct {
    st_strbuf b;  /* serialized key/value pairs, back to back */
    uint64_t n;   /* how many */
} st_gguf_kv;

void st_gguf_put_u32(st_strbuf *b, uint32_t v);
void st_gguf_put_u64(st_strbuf *b, uint64_t v);
void st_gguf_put_str(st_strbuf *b, const char *s, size_t len);

void st_gguf_kv_str(st_gguf_kv *kv, const char *key, const char *val);
void st_gguf_kv_u32(st_gguf_kv *kv, const char *key, uint32_t val);
void st_gguf_kv_f32(st_gguf_kv *kv, const char *key, float val);
void st_gguf_kv_bool(st_gguf_kv *kv, const char *key, int val);
/* Starts an array value of `count` elements of `type`; the caller appends the elements to kv->b. */
void st_gguf_kv_array(st_gguf_kv *kv, const char *key, uint32_t type, uint64_t count);

/* Adds the tokenizer.* keys from DIR/tokenizer.json (+ tokenizer_config.json, chat_template.jinja).
 * `pre` (may be NULL) overrides tokenizer.ggml.pre; without it an unrecognised split pattern is an error.
 * Returns 0 (rep->has_tokenizer set), or an error naming what cannot be represented. */
int st_gguf_add_tokenizer(st_gguf_kv *kv, const char *dir, const char *pre, const st_model_config *cfg,
                          st_gguf_report *rep);

#endif
