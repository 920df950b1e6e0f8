/* pack_text.h — `data pack --text`: a JSONL file of text examples to a dataset (worker/dataset.h).
 * The input is read line by line (bounded memory besides the tokens); each line is one document.
 * Errors name FILE line N and the reason. Progress goes through an optional callback (the library
 * never prints). */
#ifndef ST_PACK_TEXT_H
#define ST_PACK_TEXT_H

#include "text/sft.h"
#include "worker/dataset.h"

typedef struct {
    uint64_t lines, examples, tokens, trained;
    uint64_t per_format[5]; /* indexed by ST_SFT_* */
    uint64_t bos_dropped;
} st_text_pack_stats;

typedef void (*st_text_progress_fn)(void *ctx, const st_text_pack_stats *s, uint64_t bytes_done, uint64_t bytes_total);

int st_text_pack(const char *path, const st_tokenizer *tok, const st_sft_opts *opts, int64_t eos_id,
                 st_text_progress_fn progress, void *ctx, st_dataset *out, st_text_pack_stats *stats);

#endif
