/* tokenizer.h — text in and out: Hugging Face tokenizer.json (BPE, byte-level or SentencePiece-style),
 * chat templates (a Jinja subset rendered as transformers' apply_chat_template renders it) and the
 * conversion of text examples into tokens plus a loss mask for supervised fine-tuning.
 *
 * Everything here is pure computation on memory and files; no model, no ranks. Errors are negative ST_E*
 * codes with a one-line message (common/error.h) naming the file, component or template construct.
 *
 * Memory: st_tokenizer_load* returns a tokenizer owned by the caller (st_tokenizer_free). Encode/decode
 * and render return malloc'ed buffers the caller frees with free(). A loaded tokenizer is read-only and
 * may be shared by threads (encode/decode keep their scratch state on the stack or the heap per call). */
#ifndef ST_TOKENIZER_H
#define ST_TOKENIZER_H

#include "common/json.h"

#include <stddef.h>
#include <stdint.h>

typedef struct st_tokenizer st_tokenizer;

/* Loads DIR/tokenizer.json, and from DIR/tokenizer_config.json (optional) the chat template, the
 * bos/eos token strings, and from DIR/chat_template.jinja (optional) the template. */
int st_tokenizer_load(const char *dir, st_tokenizer **out);
/* Loads a tokenizer.json held in memory; `name` is used in messages. No chat template. */
int st_tokenizer_load_json(const char *name, const char *json, size_t len, st_tokenizer **out);
void st_tokenizer_free(st_tokenizer *tok);

/* Tokenizer.encode(text, add_special_tokens=add_special).ids. `*ids` is malloc'ed (may be NULL when *n == 0). */
int st_tokenizer_encode(const st_tokenizer *tok, const char *text, size_t len, int add_special, int32_t **ids,
                        size_t *n);
/* The same, with the byte offset in `text` where each token starts (*offsets malloc'ed, n entries;
 * post-processor tokens get 0 or len). */
int st_tokenizer_encode_offsets(const st_tokenizer *tok, const char *text, size_t len, int add_special, int32_t **ids,
                                uint32_t **offsets, size_t *n);
/* Tokenizer.decode(ids, skip_special_tokens=skip_special): a malloc'ed NUL-terminated UTF-8 string whose
 * byte length goes to *len (may be NULL; the text itself may hold NUL bytes from <0x00>-like tokens).
 * Unknown ids are dropped, as Hugging Face does. */
int st_tokenizer_decode(const st_tokenizer *tok, const int32_t *ids, size_t n, int skip_special, char **text,
                        size_t *len);

/* Vocabulary size including added tokens (max id + 1). */
size_t st_tokenizer_vocab_size(const st_tokenizer *tok);
/* Id of an exact token string (model vocab or added token), or -1. */
int32_t st_tokenizer_token_id(const st_tokenizer *tok, const char *token);
/* The token string of an id (NULL when unknown). Owned by the tokenizer. */
const char *st_tokenizer_id_token(const st_tokenizer *tok, int32_t id);
/* 1 when the id is an added token marked special (what skip_special_tokens skips). */
int st_tokenizer_is_special(const st_tokenizer *tok, int32_t id);

/* tokenizer_config.json values (NULL when absent). Owned by the tokenizer. */
const char *st_tokenizer_chat_template(const st_tokenizer *tok);
const char *st_tokenizer_bos_token(const st_tokenizer *tok);
const char *st_tokenizer_eos_token(const st_tokenizer *tok);

/* Renders a chat template (Jinja source) with transformers' variables: `messages` (a JSON array of
 * message objects), add_generation_prompt, bos_token/eos_token (NULL = undefined), and `extra`
 * (a JSON object of further variables, may be NULL). `*out` is malloc'ed. Unsupported constructs and
 * raise_exception() fail with a message naming the construct and its line. */
typedef struct {
    const char *bos_token, *eos_token;
    int add_generation_prompt;
    const st_json *extra;
} st_chat_opts;
int st_chat_render(const char *template_src, const st_json *messages, const st_chat_opts *opts, char **out);

#endif
