/* safetensors.h — read and write Hugging Face safetensors files (single file or sharded directory).
 *
 * File layout: 8-byte little-endian header length N, N bytes of JSON
 *   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
 * then the byte buffer; offsets are relative to the buffer start.
 *
 * Reading: st_safetensors_open() parses and validates every header (never trusting the file) but reads
 * no tensor data; st_safetensors_read_f32() preads one tensor and converts it to fp32. The handle owns
 * its file descriptors and tensor table; st_safetensors_close() releases them. Reads through one handle
 * may run concurrently from several threads (pread only).
 *
 * Writing: from fp32 data, stored as F32 / BF16 / F16, atomically (PATH.partial, fsync, rename). The caller
 * keeps ownership of the data. The streaming writer (st_safetensors_stream_*) lays out the files from the
 * shapes alone and takes the tensors one at a time, so no one holds the whole model. */
#ifndef ST_SAFETENSORS_H
#define ST_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

enum {
    ST_DTYPE_F32 = 0,
    ST_DTYPE_F16,
    ST_DTYPE_BF16,
    ST_DTYPE_F64,
    ST_DTYPE_I64,
    ST_DTYPE_I32,
    ST_DTYPE_I16,
    ST_DTYPE_I8,
    ST_DTYPE_U8,
    ST_DTYPE_BOOL,
    ST_DTYPE_COUNT
};

#define ST_ST_MAX_NDIM 8
#define ST_ST_MAX_NAME 256
/* Headers larger than this are refused (real headers are kilobytes; this bounds memory on bad input). */
#define ST_ST_MAX_HEADER (100u * 1024u * 1024u)

typedef struct {
    char name[ST_ST_MAX_NAME];
    int dtype;                      /* ST_DTYPE_* */
    int ndim;                       /* 0..8 (0 = scalar, one element) */
    int64_t shape[ST_ST_MAX_NDIM];
    uint64_t begin, end;            /* byte range within the file's data buffer */
    int file;                       /* index of the shard holding it (0 for a single file) */
} st_st_tensor;

typedef struct st_safetensors st_safetensors;

/* Opens a .safetensors file, or a model directory holding model.safetensors or (HF sharded)
 * model.safetensors.index.json plus the shards it lists. Returns 0 or ST_EIO / ST_EFORMAT with a
 * one-line message naming the file and tensor at fault. */
int st_safetensors_open(const char *path, st_safetensors **out);
void st_safetensors_close(st_safetensors *s);

int st_safetensors_count(const st_safetensors *s);
/* The i-th tensor in file order (shard by shard), NULL when out of range. */
const st_st_tensor *st_safetensors_tensor(const st_safetensors *s, int i);
/* Lookup by name (binary search), NULL when absent. */
const st_st_tensor *st_safetensors_find(const st_safetensors *s, const char *name);
/* A string value from the __metadata__ of the first file (or the index's "metadata"), NULL if absent. */
const char *st_safetensors_metadata(const st_safetensors *s, const char *key);
/* Path of shard `file` (for messages). */
const char *st_safetensors_file_path(const st_safetensors *s, int file);

/* Bytes per element of a dtype (0 for an unknown one) and its safetensors name ("F32", ...). */
size_t st_dtype_size(int dtype);
const char *st_dtype_name(int dtype);
/* Element count of a tensor (product of its shape; 1 for a scalar). */
uint64_t st_st_numel(const st_st_tensor *t);

/* Reads tensor `t` as fp32 into dst (n_elems floats). F32 is copied, F16/BF16 are upcast exactly
 * (subnormals, inf, nan kept), F64 is rounded. Fails with ST_ESHAPE if n_elems != numel (the message
 * names the tensor and both sizes), ST_EINVAL for other dtypes, ST_EIO on a short read. */
int st_safetensors_read_f32(st_safetensors *s, const st_st_tensor *t, float *dst, size_t n_elems);
/* Elements [first, first + n) of tensor `t` (flat, row-major) as fp32 into dst: one ranged pread per
 * bounded chunk, converted piece by piece (F32 / F16 / BF16 / F64) — what a rank that keeps part of a
 * tensor reads. ST_ESHAPE when the range leaves the tensor. */
int st_safetensors_read_f32_range(st_safetensors *s, const st_st_tensor *t, uint64_t first, size_t n, float *dst);
/* Elements [first, first + n) of a BF16 tensor `t` as their bf16 bits into dst, one ranged pread straight into
 * it (no conversion, no staging): what a load that holds a tensor in bf16 only reads. ST_EINVAL for any other
 * dtype, ST_ESHAPE when the range leaves the tensor. */
int st_safetensors_read_bf16_range(st_safetensors *s, const st_st_tensor *t, uint64_t first, size_t n, uint16_t *dst);
/* Reads tensor `t`'s raw little-endian bytes (any dtype); `bytes` must equal end - begin. */
int st_safetensors_read_raw(st_safetensors *s, const st_st_tensor *t, void *dst, size_t bytes);

/* fp16 / bf16 bit patterns to fp32 (exact). */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t b);

typedef struct {
    const char *name;
    const float *data;
    int ndim;
    int64_t shape[ST_ST_MAX_NDIM];
} st_st_write_item;

/* Writes n fp32 tensors (in the given order) to `path` atomically. metadata_json is a JSON object of
 * string values stored as __metadata__; NULL writes {"format":"pt"} (what transformers expects).
 * Names must be unique, non-empty and shorter than 256 bytes. */
int st_safetensors_write(const char *path, int n, const st_st_write_item *items, const char *metadata_json);

/* Writes into directory `dir` (created if needed): a single model.safetensors when the data fits in
 * max_shard_bytes, else model-0000k-of-0000n.safetensors shards (filled in order, a new shard when the
 * next tensor would overflow; a tensor larger than the limit gets its own) plus
 * model.safetensors.index.json {"metadata": {"total_size": B}, "weight_map": {name: shard}}.
 * A stale single file / index from an earlier export of the other kind is removed. */
int st_safetensors_write_sharded(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes);

/* The same two writers storing every tensor as `dtype`: ST_DTYPE_F32, or ST_DTYPE_BF16 / ST_DTYPE_F16
 * (the fp32 data rounded to nearest even, as exports in a bf16/fp16 source's dtype need). */
int st_safetensors_write_as(const char *path, int n, const st_st_write_item *items, const char *metadata_json,
                            int dtype);
int st_safetensors_write_sharded_as(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes,
                                    int dtype);

/* Streaming form of st_safetensors_write_sharded_as, byte for byte the same files: open with the items'
 * names and shapes (data is not read), then put each tensor's fp32 data, in the items' order, once; each
 * is converted and written at once (nothing is buffered but 8 KiB). finish closes the last shard, writes
 * the index and releases w (on failure too); after a failing put, abort removes the .partial being written
 * and releases w. Shards already completed stay (as with st_safetensors_write_sharded_as). */
typedef struct st_st_stream st_st_stream;
int st_safetensors_stream_open(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes,
                               int dtype, st_st_stream **out);
int st_safetensors_stream_put(st_st_stream *w, const float *data);
int st_safetensors_stream_finish(st_st_stream *w);
void st_safetensors_stream_abort(st_st_stream *w);

#endif
