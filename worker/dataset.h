/* dataset.h — the tokenized dataset file (HDF5) and the `data pack` converters that make it.
 *
 * File layout (DESIGN.md "Dataset file (HDF5)", details in docs/data.md):
 *   /tokens       uint32 [N]    every document's tokens, back to back
 *   /loss_mask    uint8  [N]    optional (all ones when absent); 0 = token i is never a prediction target
 *   /doc_offsets  uint64 [D+1]  document d is tokens[doc_offsets[d] .. doc_offsets[d+1]); first 0, last N
 *   root attributes vocab_size (int64 > 0) and eos_id (int64, -1 when none)
 *
 * A dataset lives fully in memory. Every array in st_dataset is malloc'ed and owned by the struct;
 * st_dataset_free() releases them. Loaders never trust the file: shapes, types, offsets, and token
 * ranges are all checked, and each failure is one message naming the file and the problem. */
#ifndef ST_DATASET_H
#define ST_DATASET_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t *tokens;      /* [n_tokens] */
    uint8_t *loss_mask;    /* [n_tokens], 0 or 1 */
    uint64_t *doc_offsets; /* [n_docs + 1] */
    uint64_t n_tokens, n_docs;
    int64_t vocab_size, eos_id; /* eos_id = -1 when none */
    uint64_t checksum;          /* st_dataset_checksum(): FNV-1a over tokens then loss_mask */
    char path[1024];            /* the file it was loaded from / written to ("" when packed in memory) */
} st_dataset;

/* Reads and validates a dataset file. On failure *ds is left empty (nothing to free). */
int st_dataset_load(const char *path, st_dataset *ds);

/* Writes ds atomically (PATH.partial, then rename); chunked, deflate(1)-compressed datasets.
 * Validates ds first (same rules as load). */
int st_dataset_write(const char *path, const st_dataset *ds);

/* Checks the in-memory invariants: non-empty, offsets monotone from 0 to N, mask values 0/1,
 * every token < vocab_size, eos_id in [-1, vocab_size). `what` names the source in messages. */
int st_dataset_validate(const st_dataset *ds, const char *what);

/* FNV-1a (st_fnv1a) over the tokens' bytes, then the mask's bytes. */
uint64_t st_dataset_checksum(const st_dataset *ds);

/* Streaming writer: the same file layout, written document by document in bounded memory (a few MB of
 * buffers, whatever the size of the data): PATH.partial is renamed to PATH by a successful close, and
 * removed by abort or a failed close (nothing half-written is left). add checks every token < vocab_size
 * (vocab_size <= 0: max(id, eos_id) + 1, written at close) and mask values 0/1; close refuses a file
 * without documents or tokens. close and abort free the writer. */
typedef struct st_dataset_writer st_dataset_writer;
typedef struct {
    uint64_t docs, tokens, masked;
    int64_t vocab_size, eos_id;
} st_dataset_summary;
int st_dataset_writer_open(st_dataset_writer **w, const char *path, int64_t vocab_size, int64_t eos_id);
int st_dataset_writer_add(st_dataset_writer *w, const int32_t *tokens, const uint8_t *mask, size_t n);
int st_dataset_writer_add_u32(st_dataset_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n);
int st_dataset_writer_close(st_dataset_writer *w, st_dataset_summary *out);
void st_dataset_writer_abort(st_dataset_writer *w);

/* Packs a JSONL file: one object per line with "input_ids" (non-negative ints) and optional "labels"
 * (same length; -100 masks the position, any other label must equal the input id). Empty lines are
 * skipped. When eos_id >= 0 an EOS token (loss_mask 1) is appended to each document. vocab > 0 is
 * validated against; vocab <= 0 means max(id, eos_id) + 1. Errors name FILE:LINE. */
int st_dataset_pack_jsonl(const char *jsonl_path, int64_t vocab, int64_t eos_id, st_dataset *out);

/* The same, streamed: the JSONL file is read line by line and written to out_path with st_dataset_writer,
 * so memory stays bounded by the longest line whatever the file size (data pack --jsonl). progress
 * (may be NULL) is called every 4096 lines and at the end with lines, tokens and bytes read / total. */
typedef void (*st_pack_progress_fn)(void *ctx, uint64_t lines, uint64_t tokens, uint64_t bytes_done,
                                    uint64_t bytes_total);
int st_dataset_pack_jsonl_file(const char *jsonl_path, const char *out_path, int64_t vocab, int64_t eos_id,
                               st_pack_progress_fn progress, void *ctx, st_dataset_summary *out);
/* Same from a buffer already in memory; `name` is used in messages (the fuzzer calls this). */
int st_dataset_pack_jsonl_buffer(const char *name, const char *text, size_t len, int64_t vocab, int64_t eos_id,
                                 st_dataset *out);

/* Packs llm.c token shards (header of 256 int32: magic 20240520, version 1, token count; then uint16
 * tokens) matched by glob_pattern, in sorted order. The stream is split into documents at every EOS
 * token (eos_id, or GPT-2's 50256 when eos_id < 0); llm.c puts the EOS at the *start* of each document,
 * so a document is [EOS, tokens...], and a document may continue across shard boundaries. */
#define ST_GPT2_EOT 50256
int st_dataset_pack_llmc(const char *glob_pattern, int64_t vocab, int64_t eos_id, st_dataset *out);


/* Number of tokens with loss_mask == 0. */
uint64_t st_dataset_masked_tokens(const st_dataset *ds);

void st_dataset_free(st_dataset *ds);

#endif
