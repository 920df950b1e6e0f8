/* sft.h — one text example (a parsed JSONL row) to tokens and a loss mask, for `data pack --text`.
 *
 * Formats: chat ({"messages": [{"role", "content"}, ...]} or ShareGPT's {"conversations": [{"from",
 * "value"}]}), Alpaca ({"instruction", "input"?, "output"}), prompt/completion ({"prompt", "completion"},
 * strings or message lists) and plain {"text"}. Chat-like examples are rendered with the chat template as
 * transformers' apply_chat_template renders them and tokenized without adding special tokens (the template
 * carries BOS); the assistant spans come from rendering the conversation turn by turn. The caller owns
 * the output arrays (free()). */
#ifndef ST_SFT_H
#define ST_SFT_H

#include "common/json.h"
#include "text/tokenizer.h"

#include <stddef.h>
#include <stdint.h>

enum { ST_SFT_AUTO, ST_SFT_CHAT, ST_SFT_ALPACA, ST_SFT_PROMPT, ST_SFT_TEXT };
enum { ST_TRAIN_DEFAULT, ST_TRAIN_ALL, ST_TRAIN_ASSISTANT, ST_TRAIN_LAST };

typedef struct {
    int format;               /* ST_SFT_* */
    int train_on;             /* ST_TRAIN_*; DEFAULT = all for text, assistant otherwise */
    const char *template_src; /* chat template (NULL: chat examples are refused, alpaca/prompt use plain text) */
    const int32_t *end_ids;   /* the model's end tokens (generation_config eos_token_id, tokenizer eos) */
    size_t n_end;
} st_sft_opts;

typedef struct {
    int32_t *ids;
    uint8_t *mask;
    size_t n;
    int format;     /* the format used (after auto detection) */
    int bos_dropped; /* a doubled BOS was removed */
} st_sft_example;

/* Converts one row. Errors (ST_EINVAL) say why, without the line number (the caller adds it). */
int st_sft_convert(const st_tokenizer *tok, const st_sft_opts *opts, const st_json *row, st_sft_example *out);
void st_sft_example_free(st_sft_example *ex);

/* The end-token ids of a model directory: generation_config.json eos_token_id (an int or a list), then
 * config.json's, then the tokenizer's eos_token. *ids is malloc'ed (may be empty). */
int st_sft_end_ids(const char *dir, const st_tokenizer *tok, int32_t **ids, size_t *n);

/* Parses a format / train-on name ("auto", "chat", ... / "all", "assistant", "last"); -1 if unknown. */
int st_sft_format_from_name(const char *name);
int st_sft_train_on_from_name(const char *name);

#endif
