/* gen_text.h — text in and out for `generate` and `compare`: a prompt line's text ("prompt", or
 * "messages" rendered with the model's chat template) to token ids, and ids back to text, with the model
 * directory's tokenizer (the text/ module). Semantics follow transformers: a plain prompt is
 * `tokenizer(text)` (special tokens added); a chat is `apply_chat_template(messages,
 * add_generation_prompt=True)` then encoded without adding special tokens again; answers are
 * `decode(ids, skip_special_tokens=True)`.
 *
 * Memory: st_gen_text is owned by the caller (st_gen_text_free); encode/decode return malloc'ed buffers. */
#ifndef ST_GEN_TEXT_H
#define ST_GEN_TEXT_H

#include <stdint.h>

typedef struct st_gen_text st_gen_text;

/* Opens DIR's tokenizer (tokenizer.json, tokenizer_config.json / chat_template.jinja). *out is NULL
 * (and 0 returned) when DIR has no tokenizer.json: text is then unavailable. */
int st_gen_text_open(const char *dir, st_gen_text **out);
void st_gen_text_free(st_gen_text *t);

/* The ids of a prompt line (its JSON object text): {"prompt": s} (with chat: as one user message) or
 * {"messages": [...]} (always through the chat template). Errors name the missing piece. */
int st_gen_text_encode(const st_gen_text *t, const char *line_json, int chat, int32_t **ids, int *n);

/* tokenizer(text, add_special_tokens=add_special).ids */
int st_gen_text_encode_plain(const st_gen_text *t, const char *text, int add_special, int32_t **ids, int *n);

/* decode(ids, skip_special_tokens=True) as a NUL-terminated string. */
int st_gen_text_decode(const st_gen_text *t, const int32_t *ids, int n, char **text);

/* The tokenizer's end token id (tokenizer_config.json eos_token), or -1. */
int32_t st_gen_text_eos(const st_gen_text *t);

#endif
