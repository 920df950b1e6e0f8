/* pack_text.h — `data pack --text`: a JSONL file of text examples to documents of token ids and loss
 * masks. The input is read line by line (memory bounded by the longest line, whatever the file size);
 * each line is one document, handed to `emit` as soon as it is converted (the caller writes it; the
 * module knows no file format). Errors name FILE line N and the reason. Progress goes through an
 * optional callback, every 256 lines and at the end (the library never prints). */
#ifndef ST_PACK_TEXT_H
#define ST_PACK_TEXT_H

#include "text/sft.h"

typedef struct {
    uint64_t lines, examples, tokens, trained;
    uint64_t per_format[5]; /* indexed by ST_SFT_* */
    uint64_t bos_dropped;
} st_text_pack_stats;

typedef void (*st_text_progress_fn)(void *ctx, const st_text_pack_stats *s, uint64_t bytes_done, uint64_t bytes_total);

/* Receives one document (ids and mask [n], borrowed for the call); a negative return stops the pack. */
typedef int (*st_text_emit_fn)(void *ctx, const int32_t *ids, const uint8_t *mask, size_t n);

int st_text_pack(const char *path, const st_tokenizer *tok, const st_sft_opts *opts, st_text_emit_fn emit,
                 void *emit_ctx, st_text_progress_fn progress, void *ctx, st_text_pack_stats *stats);

#endif
