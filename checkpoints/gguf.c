/* gguf.c — GGUF v3 writer for GPT-2 / Llama-family models (see gguf.h and docs/compress.md).
 *
 * File layout (little-endian): "GGUF", version 3, tensor count, metadata count, the metadata key/value
 * pairs, the tensor infos (name, dims with the row length first, ggml type, offset into the data
 * section), zero padding to general.alignment (32), then each tensor's bytes, each padded to 32. */
#include "checkpoints/gguf.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "checkpoints/gguf_internal.h"
#include "common/error.h"
#include "worker/lora.h"

#define GGUF_ALIGN 32
#define GGUF_VERSION 3

/* ---------------- metadata builder ---------------- */

void st_gguf_put_u32(st_strbuf *b, uint32_t v) { st_strbuf_append(b, (const char *)&v, 4); }
void st_gguf_put_u64(st_strbuf *b, uint64_t v) { st_strbuf_append(b, (const char *)&v, 8); }
void st_gguf_put_str(st_strbuf *b, const char *s, size_t len) {
    st_gguf_put_u64(b, len);
    st_strbuf_append(b, s, len);
}

static void kv_key(st_gguf_kv *kv, const char *key, uint32_t type) {
    st_gguf_put_str(&kv->b, key, strlen(key));
    st_gguf_put_u32(&kv->b, type);
    kv->n++;
}
void st_gguf_kv_str(st_gguf_kv *kv, const char *key, const char *val) {
    kv_key(kv, key, GGUF_STR);
    st_gguf_put_str(&kv->b, val, strlen(val));
}
void st_gguf_kv_u32(st_gguf_kv *kv, const char *key, uint32_t val) {
    kv_key(kv, key, GGUF_U32);
    st_gguf_put_u32(&kv->b, val);
}
void st_gguf_kv_f32(st_gguf_kv *kv, const char *key, float val) {
    kv_key(kv, key, GGUF_F32);
    st_strbuf_append(&kv->b, (const char *)&val, 4);
}
void st_gguf_kv_bool(st_gguf_kv *kv, const char *key, int val) {
    kv_key(kv, key, GGUF_BOOL);
    char c = val ? 1 : 0;
    st_strbuf_append(&kv->b, &c, 1);
}
void st_gguf_kv_array(st_gguf_kv *kv, const char *key, uint32_t type, uint64_t count) {
    kv_key(kv, key, GGUF_ARR);
    st_gguf_put_u32(&kv->b, type);
    st_gguf_put_u64(&kv->b, count);
}

/* ---------------- tensors ---------------- */

typedef struct {
    char name[64];
    int ndim;
    int64_t ne[2];        /* ne[0] = row length (the fastest dimension), ne[1] = rows */
    st_ggml_type type;
    const float *src;     /* internal layout [rows, ne0]; streamed: set to the fetched buffer when written */
    int param;            /* the model parameter it comes from (GPT-2's tied head: the embedding's) */
    int permute_heads;    /* > 0: llama.cpp's Q/K row permutation with this many heads */
    int ranged;           /* streamed: read a piece of rows at a time through the source's rows() */
    uint64_t offset;      /* into the data section */
} gtensor;

static const char *arch_of(const st_model_config *c) {
    if (c->family == ST_FAMILY_GPT2) return "gpt2";
    return strcmp(c->model_type, "qwen2") == 0 ? "qwen2" : "llama"; /* mistral runs as llama */
}

/* HF in-layer suffix -> llama.cpp name (without "blk.N."). */
static const char *const k_layer_map[][2] = {
    {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
    {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
    {"mlp.down_proj", "ffn_down"}, {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"},
    {"ln_1", "attn_norm"}, {"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"}, {"ln_2", "ffn_norm"},
    {"mlp.c_fc", "ffn_up"}, {"mlp.c_proj", "ffn_down"},
};
static const char *const k_top_map[][2] = {
    {"model.embed_tokens", "token_embd"}, {"wte", "token_embd"}, {"wpe", "position_embd"},
    {"model.norm", "output_norm"}, {"ln_f", "output_norm"}, {"lm_head", "output"},
};

/* llama.cpp's name for HF parameter `hf` ("model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight"). */
static int gguf_name(const char *hf, char *out, size_t size) {
    const char *dot = strrchr(hf, '.'); /* ".weight" / ".bias" */
    if (!dot) return st_fail(ST_EINVAL, "gguf: cannot map tensor '%s'", hf);
    size_t stem = (size_t)(dot - hf);
    int layer = -1, used = 0;
    if (sscanf(hf, "model.layers.%d.%n", &layer, &used) == 1 || sscanf(hf, "h.%d.%n", &layer, &used) == 1) {
        for (size_t i = 0; i < sizeof k_layer_map / sizeof k_layer_map[0]; i++) {
            size_t k = strlen(k_layer_map[i][0]);
            if (stem - (size_t)used == k && strncmp(hf + used, k_layer_map[i][0], k) == 0) {
                snprintf(out, size, "blk.%d.%s%s", layer, k_layer_map[i][1], dot);
                return 0;
            }
        }
    } else {
        for (size_t i = 0; i < sizeof k_top_map / sizeof k_top_map[0]; i++) {
            size_t k = strlen(k_top_map[i][0]);
            if (stem == k && strncmp(hf, k_top_map[i][0], k) == 0) {
                snprintf(out, size, "%s%s", k_top_map[i][1], dot);
                return 0;
            }
        }
    }
    return st_fail(ST_EINVAL, "gguf: no llama.cpp name for tensor '%s'", hf);
}

static int is_suffix(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static int is_kquant(st_ggml_type q) {
    return q == ST_GGML_Q2_K || q == ST_GGML_Q3_K || q == ST_GGML_Q4_K || q == ST_GGML_Q5_K || q == ST_GGML_Q6_K ||
           q == ST_GGUF_MIX_Q4_K_M || q == ST_GGUF_MIX_Q5_K_M;
}

/* llama.cpp's tensor_type_fallback: a k-quant whose rows are not a multiple of 256 goes to a 32-block type
 * (q2_K, q3_K -> q4_0; q4_K -> q5_0; q5_K -> q5_1; q6_K -> q8_0), and to f16 when even that does not fit. */
static st_ggml_type kquant_fallback(st_ggml_type want, int64_t ne0) {
    if (ne0 % st_ggml_block_size(want) == 0) return want;
    st_ggml_type got = want == ST_GGML_Q4_K ? ST_GGML_Q5_0 : want == ST_GGML_Q5_K ? ST_GGML_Q5_1
                     : want == ST_GGML_Q6_K ? ST_GGML_Q8_0 : ST_GGML_Q4_0; /* q2_K, q3_K */
    return ne0 % st_ggml_block_size(got) == 0 ? got : ST_GGML_F16;
}

/* llama-quantize's layer pick for the _M mixes: the first and last eighth of the layers and every third
 * one between them. */
static int use_more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

/* A tensor's type under a k-quant `--quant` (llama-quantize's rules: docs/compress.md). The output head
 * (output.weight, or token_embd when it doubles as the head) q6_K. q2_K..q6_K: every other 2-D tensor in
 * that type (llama-quantize's "pure" recipe with a q6_K head). q4_K_M / q5_K_M: q4_K / q5_K, except the
 * attention value projections (attn_v, GPT-2's fused attn_qkv) and ffn_down of the layers use_more_bits
 * picks, which get q6_K. Then kquant_fallback for rows that do not fit; position_embd stays f16 (llama-
 * quantize leaves it as the converter wrote it). */
static st_ggml_type pick_kquant(const gtensor *t, st_ggml_type quant, int head, int n_layer, int *fallback) {
    if (strcmp(t->name, "position_embd.weight") == 0) return ST_GGML_F16;
    st_ggml_type want = quant == ST_GGUF_MIX_Q4_K_M ? ST_GGML_Q4_K : quant == ST_GGUF_MIX_Q5_K_M ? ST_GGML_Q5_K : quant;
    int layer = -1;
    if (head) {
        want = ST_GGML_Q6_K;
    } else if (want != quant && sscanf(t->name, "blk.%d.", &layer) == 1) {
        int more = is_suffix(t->name, ".attn_v.weight") || is_suffix(t->name, ".attn_qkv.weight") ||
                   is_suffix(t->name, ".ffn_down.weight");
        if (more && use_more_bits(layer, n_layer)) want = ST_GGML_Q6_K;
    }
    st_ggml_type got = kquant_fallback(want, t->ne[0]);
    if (got != want) (*fallback)++;
    return got;
}

/* The ggml type a tensor is stored in: 1-D tensors (norms, biases) stay f32 like llama.cpp's converter;
 * rows that do not fill whole 32-element blocks fall back to f16, as the converter does on QuantError.
 * `head`: the tensor is the output head (the k-quants store it at higher precision). */
static st_ggml_type pick_type(const gtensor *t, st_ggml_type quant, int head, int n_layer, int *fallback) {
    if (t->ndim == 1) return ST_GGML_F32;
    if (is_kquant(quant)) return pick_kquant(t, quant, head, n_layer, fallback);
    if ((quant == ST_GGML_Q8_0 || quant == ST_GGML_Q4_0) && t->ne[0] % 32 != 0) {
        (*fallback)++;
        return ST_GGML_F16;
    }
    return quant;
}

static int build_tensors(const st_model *m, const float *w, st_ggml_type quant, gtensor *ts, int *n, int *fallback) {
    const st_model_config *c = &m->cfg;
    int llama_arch = c->family == ST_FAMILY_LLAMA && strcmp(arch_of(c), "llama") == 0;
    int k = 0, rc;
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        gtensor *t = &ts[k++];
        memset(t, 0, sizeof *t);
        if ((rc = gguf_name(p->name, t->name, sizeof t->name))) return rc;
        t->ndim = p->ndim;
        t->ne[0] = p->ndim == 2 ? p->shape[1] : p->shape[0]; /* internal [out, in]: rows of `in` */
        t->ne[1] = p->ndim == 2 ? p->shape[0] : 1;
        t->src = w ? w + p->offset : NULL;
        t->param = i;
        /* llama.cpp's convert_hf_to_gguf permutes q/k rows of `llama` models (rotate-half -> interleaved
         * RoPE pairs); qwen2 runs NEOX-style RoPE on the HF layout as is. */
        if (llama_arch && is_suffix(p->name, "q_proj.weight")) t->permute_heads = c->n_head;
        if (llama_arch && is_suffix(p->name, "k_proj.weight")) t->permute_heads = c->n_kv_head;
        /* the head: output.weight, or a tied llama/qwen2 model's token_embd (no output.weight is written) */
        int head = strcmp(t->name, "output.weight") == 0 ||
                   (strcmp(t->name, "token_embd.weight") == 0 && c->tied_embeddings && c->family != ST_FAMILY_GPT2);
        t->type = pick_type(t, quant, head, c->n_layer, fallback);
        /* GPT-2's head is always stored (the converter writes output.weight as a copy of wte) */
        if (c->family == ST_FAMILY_GPT2 && c->tied_embeddings && i == 0) {
            gtensor *o = &ts[k++];
            *o = *t;
            snprintf(o->name, sizeof o->name, "output.weight");
            o->type = pick_type(o, quant, 1, c->n_layer, fallback);
        }
    }
    *n = k;
    return 0;
}

/* Rows of head h, [2, hd/2] -> [hd/2, 2]: new row 2*i+j = old row j*hd/2+i (LlamaModel.permute). */
static void permute_rows(const float *src, float *dst, int64_t rows, int64_t cols, int heads) {
    int64_t hd = rows / heads, half = hd / 2;
    for (int h = 0; h < heads; h++)
        for (int64_t i = 0; i < half; i++)
            for (int j = 0; j < 2; j++)
                memcpy(dst + (h * hd + 2 * i + j) * cols, src + (h * hd + j * half + i) * cols, (size_t)cols * 4);
}

/* The source row of permuted row r (permute_rows' inverse map), so that encoders read rows in place. */
static int64_t permuted_src_row(int64_t r, int64_t rows, int heads) {
    int64_t hd = rows / heads, half = hd / 2, h = r / hd, k = r % hd;
    return h * hd + (k % 2) * half + k / 2;
}

static uint64_t align_up(uint64_t x) { return (x + GGUF_ALIGN - 1) / GGUF_ALIGN * GGUF_ALIGN; }

static uint32_t file_type(st_ggml_type q) {
    switch (q) { /* llama.cpp's enum llama_ftype */
    case ST_GGML_F32: return 0;
    case ST_GGML_F16: return 1;
    case ST_GGML_Q4_0: return 2;
    case ST_GGML_Q8_0: return 7;
    case ST_GGML_BF16: return 32;
    /* the single k-quants are llama-quantize's pure recipes (q6_K head, no per-layer mixing) of: */
    case ST_GGML_Q2_K: return 10; /* LLAMA_FTYPE_MOSTLY_Q2_K */
    case ST_GGML_Q3_K: return 11; /* _Q3_K_S */
    case ST_GGML_Q4_K: return 14; /* _Q4_K_S */
    case ST_GGML_Q5_K: return 16; /* _Q5_K_S */
    case ST_GGML_Q6_K: return 18; /* _Q6_K */
    case ST_GGUF_MIX_Q4_K_M: return 15;
    case ST_GGUF_MIX_Q5_K_M: return 17;
    default: return 0;
    }
}

static void model_metadata(st_gguf_kv *kv, const st_model_config *c, st_ggml_type quant, const st_gguf_options *opt) {
    const char *arch = arch_of(c);
    char key[96];
#define K(suffix) (snprintf(key, sizeof key, "%s." suffix, arch), key)
    st_gguf_kv_str(kv, "general.architecture", arch);
    if (opt && opt->name) st_gguf_kv_str(kv, "general.name", opt->name);
    st_gguf_kv_u32(kv, "general.alignment", GGUF_ALIGN);
    st_gguf_kv_u32(kv, "general.file_type", file_type(quant));
    st_gguf_kv_u32(kv, "general.quantization_version", 2);
    st_gguf_kv_u32(kv, K("vocab_size"), (uint32_t)c->vocab);
    st_gguf_kv_u32(kv, K("context_length"), (uint32_t)c->max_seq);
    st_gguf_kv_u32(kv, K("embedding_length"), (uint32_t)c->d_model);
    st_gguf_kv_u32(kv, K("block_count"), (uint32_t)c->n_layer);
    st_gguf_kv_u32(kv, K("feed_forward_length"), (uint32_t)c->d_ff);
    st_gguf_kv_u32(kv, K("attention.head_count"), (uint32_t)c->n_head);
    if (c->family == ST_FAMILY_GPT2) {
        st_gguf_kv_f32(kv, K("attention.layer_norm_epsilon"), c->norm_eps);
    } else {
        st_gguf_kv_u32(kv, K("attention.head_count_kv"), (uint32_t)c->n_kv_head);
        st_gguf_kv_f32(kv, K("attention.layer_norm_rms_epsilon"), c->norm_eps);
        st_gguf_kv_f32(kv, K("rope.freq_base"), c->rope_theta);
        st_gguf_kv_u32(kv, K("rope.dimension_count"), (uint32_t)c->head_dim);
        st_gguf_kv_u32(kv, K("attention.key_length"), (uint32_t)c->head_dim);
        st_gguf_kv_u32(kv, K("attention.value_length"), (uint32_t)c->head_dim);
    }
#undef K
}

#define CHUNK_BYTES (1u << 20) /* encoded bytes per write: stays in cache between encode and fwrite */
#define PIECE_FLOATS (1u << 15) /* a ranged read's piece: 128 KB of floats (+ the read's staging) in L2 */

/* ---------------- pipelined writer ----------------
 * The encoders (rows in parallel on the OpenMP threads) fill one chunk while a writer thread fwrite()s the
 * previous one: two slots, handed over in order. A slot either owns its chunk buffer (encoded rows) or
 * points at bytes that stay valid until the writer is drained (f32 rows straight from the source, the
 * permutation scratch, padding). Without a thread (pthread_create failed) every push writes at once. */
typedef struct {
    const void *p;
    size_t n;
    int full;
    uint8_t *buf; /* CHUNK_BYTES or one row */
} wslot;

typedef struct {
    FILE *f;
    pthread_t th;
    int threaded;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    wslot s[2];
    int head;   /* next slot the producer fills */
    int stop;
    int failed; /* an fwrite came short: the producer stops early, write_file reports it */
    off_t pos, synced; /* file offset written so far / handed to writeback so far */
} gwriter;

#define WRITEBACK_BYTES (4u << 20) /* writes between early writeback requests (and the largest single fwrite) */

/* Writes n bytes in pieces of WRITEBACK_BYTES and, after each, starts the kernel's writeback of what is
 * written (sync_file_range, not waiting for it): the disk writes while the next chunks are encoded, so the
 * final fsync only waits for the tail instead of the whole file (the raw write+fsync that gguf_bench
 * compares against flushes everything at its end). Returns 0, or -1 when an fwrite came short. */
static int writer_emit(gwriter *w, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n) {
        size_t k = n < WRITEBACK_BYTES ? n : WRITEBACK_BYTES;
        if (fwrite(b, 1, k, w->f) != k) return -1;
        b += k;
        n -= k;
        w->pos += (off_t)k;
#ifdef SYNC_FILE_RANGE_WRITE
        if (w->pos - w->synced >= (off_t)WRITEBACK_BYTES) {
            if (fflush(w->f)) return -1;
            /* advisory: a failure here (a file system without it) leaves the work to the final fsync */
            (void)sync_file_range(fileno(w->f), w->synced, w->pos - w->synced, SYNC_FILE_RANGE_WRITE);
            w->synced = w->pos;
        }
#endif
    }
    return 0;
}

static void *writer_main(void *arg) {
    gwriter *w = arg;
    for (int k = 0;; k ^= 1) {
        pthread_mutex_lock(&w->mu);
        while (!w->s[k].full && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->s[k].full) { /* stop, nothing left */
            pthread_mutex_unlock(&w->mu);
            return NULL;
        }
        const void *p = w->s[k].p;
        size_t n = w->s[k].n;
        pthread_mutex_unlock(&w->mu);
        pthread_mutex_lock(&w->mu);
        int skip = w->failed;
        pthread_mutex_unlock(&w->mu);
        int bad = !skip && writer_emit(w, p, n);
        pthread_mutex_lock(&w->mu);
        if (bad) w->failed = 1;
        w->s[k].full = 0;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
}

/* The next slot, once the writer has emptied it. */
static wslot *writer_slot(gwriter *w) {
    wslot *s = &w->s[w->head];
    if (w->threaded) {
        pthread_mutex_lock(&w->mu);
        while (s->full) pthread_cond_wait(&w->cv, &w->mu);
        pthread_mutex_unlock(&w->mu);
    }
    return s;
}

/* Hands slot s (filled: p, n) to the writer. */
static void writer_push(gwriter *w, wslot *s, const void *p, size_t n) {
    if (!w->threaded) {
        if (!w->failed && writer_emit(w, p, n)) w->failed = 1;
        return;
    }
    pthread_mutex_lock(&w->mu);
    s->p = p;
    s->n = n;
    s->full = 1;
    w->head ^= 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int writer_failed(gwriter *w) {
    if (!w->threaded) return w->failed;
    pthread_mutex_lock(&w->mu);
    int bad = w->failed;
    pthread_mutex_unlock(&w->mu);
    return bad;
}

/* Waits until everything pushed is written (before reusing memory a slot points at). */
static void writer_drain(gwriter *w) {
    if (!w->threaded) return;
    pthread_mutex_lock(&w->mu);
    while (w->s[0].full || w->s[1].full) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

static int writer_start(gwriter *w, FILE *f, size_t buf_bytes) {
    memset(w, 0, sizeof *w);
    w->f = f;
    w->pos = w->synced = ftello(f); /* after the header */
    for (int k = 0; k < 2; k++)
        if (!(w->s[k].buf = malloc(buf_bytes + 1))) return -1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->threaded = pthread_create(&w->th, NULL, writer_main, w) == 0;
    return 0;
}

/* Drains and stops the writer; 0, or -1 when a write failed. */
static int writer_finish(gwriter *w) {
    if (w->threaded) {
        writer_drain(w);
        pthread_mutex_lock(&w->mu);
        w->stop = 1;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->th, NULL);
    }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->s[0].buf);
    free(w->s[1].buf);
    return w->failed ? -1 : 0;
}

/* Converts and writes one tensor's data in chunks of whole rows (scratch: rows*cols floats when an f32 tensor
 * is permuted). f32 rows are written straight from the source (or the scratch); the encoders read a permuted
 * tensor's rows in place. Each chunk is encoded into a cache-sized slot buffer while the writer thread writes
 * the previous one (bench/gguf_bench.c). */
static int write_tensor(gwriter *w, const gtensor *t, float *scratch) {
    static const char zeros[GGUF_ALIGN];
    const float *src = t->src;
    if (t->permute_heads && t->type == ST_GGML_F32) {
        writer_drain(w); /* the scratch may still be queued from the previous permuted tensor */
        permute_rows(t->src, scratch, t->ne[1], t->ne[0], t->permute_heads);
        src = scratch;
    }
    size_t row = st_ggml_row_bytes(t->type, t->ne[0]), bytes = row * (size_t)t->ne[1];
    if (t->type == ST_GGML_F32) {
        writer_push(w, writer_slot(w), src, bytes);
    } else {
        int64_t per = (int64_t)(CHUNK_BYTES / row);
        if (per < 1) per = 1;
        /* the block quantizers are compute-bound: rows in parallel on the rank's threads, handed out a few
         * at a time (a thread the OS has descheduled on a busy machine holds up the chunk by at most that) */
        int heavy = t->type != ST_GGML_F16 && t->type != ST_GGML_BF16;
        for (int64_t r0 = 0; r0 < t->ne[1] && !writer_failed(w); r0 += per) {
            int64_t n = t->ne[1] - r0 < per ? t->ne[1] - r0 : per;
            wslot *s = writer_slot(w);
            uint8_t *enc = s->buf;
#pragma omp parallel for schedule(dynamic, 4) if (heavy && n > 8)
            for (int64_t r = 0; r < n; r++) {
                int64_t sr = t->permute_heads ? permuted_src_row(r0 + r, t->ne[1], t->permute_heads) : r0 + r;
                st_ggml_encode(t->type, src + sr * t->ne[0], t->ne[0], enc + r * row);
            }
            writer_push(w, s, enc, row * (size_t)n);
        }
    }
    size_t pad = (size_t)(align_up(bytes) - bytes);
    if (pad) writer_push(w, writer_slot(w), zeros, pad);
    return writer_failed(w) ? 1 : 0;
}

/* A ranged tensor's piece: whole rows, whole heads when permuted (the permutation stays within a head, so
 * a piece's output rows come from the same source rows), about PIECE_FLOATS values. */
static int64_t piece_rows(const gtensor *t) {
    int64_t g = t->permute_heads ? t->ne[1] / t->permute_heads : 1, per = (int64_t)PIECE_FLOATS / t->ne[0];
    per = per / g * g;
    return per < g ? g : per;
}

/* The ranged reads' per-thread piece buffers, and the first failure of a rows() call (its thread's message). */
typedef struct {
    float **buf;
    int n;
    size_t floats;
    volatile int failed;
    int rc;
    char err[1024];
} gpieces;

/* Reads, converts and encodes one ranged tensor: per chunk of whole pieces (about CHUNK_BYTES encoded), the
 * OpenMP threads take pieces one at a time, each read by rows() into the thread's own buffer (in L2) and
 * encoded from there into the chunk, which the writer thread then writes while the next chunk is read and
 * encoded: the source values are touched once, in cache, and no buffer of the tensor exists. */
static int write_tensor_ranged(gwriter *w, const gtensor *t, const st_model *m, const st_gguf_source *src,
                               gpieces *pc) {
    static const char zeros[GGUF_ALIGN];
    const int64_t cols = t->ne[0], rows = t->ne[1], pr = piece_rows(t);
    size_t row = st_ggml_row_bytes(t->type, cols), bytes = row * (size_t)rows;
    int64_t per = (int64_t)(CHUNK_BYTES / row) / pr * pr;
    if (per < pr) per = pr;
    for (int64_t r0 = 0; r0 < rows && !writer_failed(w) && !pc->failed; r0 += per) {
        int64_t n = rows - r0 < per ? rows - r0 : per, np = (n + pr - 1) / pr;
        wslot *s = writer_slot(w);
        uint8_t *enc = s->buf;
#pragma omp parallel for schedule(dynamic, 1) if (np > 1)
        for (int64_t p = 0; p < np; p++) {
            if (pc->failed) continue;
#ifdef _OPENMP
            float *x = pc->buf[omp_get_thread_num() % pc->n];
#else
            float *x = pc->buf[0];
#endif
            int64_t a = r0 + p * pr, k = r0 + n - a < pr ? r0 + n - a : pr;
            int rc = src->rows(src->ctx, m, t->param, a, k, x);
            if (rc) {
#pragma omp critical(gguf_piece_error)
                if (!pc->failed) {
                    pc->rc = rc;
                    snprintf(pc->err, sizeof pc->err, "%s", st_error());
                    pc->failed = 1;
                }
                continue;
            }
            for (int64_t r = 0; r < k; r++) {
                int64_t sr = t->permute_heads ? permuted_src_row(a + r, rows, t->permute_heads) - a : r;
                uint8_t *o = enc + (a - r0 + r) * row;
                if (t->type == ST_GGML_F32) memcpy(o, x + sr * cols, row);
                else st_ggml_encode(t->type, x + sr * cols, cols, o);
            }
        }
        if (pc->failed) break;
        writer_push(w, s, enc, row * (size_t)n);
    }
    if (pc->failed) return st_fail(pc->rc, "%s", pc->err);
    size_t pad = (size_t)(align_up(bytes) - bytes);
    if (pad) writer_push(w, writer_slot(w), zeros, pad);
    return writer_failed(w) ? 1 : 0;
}

/* ---------------- streamed source ----------------
 * st_gguf_export_streamed: a helper thread fetches (reads and converts) the next parameter into one of two
 * buffers while the tensor in the other is encoded and written. */
typedef struct {
    const st_model *m;
    st_model_fetch_fn fetch;
    void *ctx;
    const st_gguf_source *src; /* its rows() serve the ranged tensors */
    float *buf[2];
    int have[2];    /* the parameter buf[k] holds, -1: none */
    int direct[2];  /* buf[k] was handed to the writer as is (an f32 tensor): drain before refilling it */
    int pending;    /* a fetch was started and not yet waited for */
    int threaded;   /* ... on its own thread */
    int next, param, rc; /* its buffer, parameter and result */
    pthread_t th;
    char err[1024]; /* its st_error() when it failed (the message is thread-local) */
} gfeed;

static void *feed_main(void *arg) {
    gfeed *f = arg;
    f->rc = f->fetch(f->ctx, f->m, f->param, f->buf[f->next]);
    if (f->rc) snprintf(f->err, sizeof f->err, "%s", st_error());
    return NULL;
}

/* Starts fetching parameter i into buffer k (inline when no thread can be started). */
static void feed_start(gfeed *f, int i, int k) {
    f->param = i;
    f->next = k;
    f->have[k] = -1;
    f->rc = 0;
    f->pending = 1;
    f->threaded = pthread_create(&f->th, NULL, feed_main, f) == 0;
    if (!f->threaded) feed_main(f);
}

/* Waits for the fetch started last: 0 (its buffer now holds it) or its error, the message set here. */
static int feed_wait(gfeed *f) {
    if (!f->pending) return 0;
    if (f->threaded) pthread_join(f->th, NULL);
    f->pending = f->threaded = 0;
    if (f->rc) return st_fail(f->rc, "%s", f->err);
    f->have[f->next] = f->param;
    return 0;
}

/* Points ts[i] at its fetched values: waits for them when its parameter is not the one already held, then
 * starts fetching the next parameter into the other buffer (once the writer is done with what it held). */
static int feed_tensor(gfeed *f, gwriter *w, gtensor *ts, int n, int i, int *cur) {
    gtensor *t = &ts[i];
    if (t->ranged) return 0;
    if (*cur < 0 || f->have[*cur] != t->param) {
        if (!f->pending) feed_start(f, t->param, 0); /* the first tensor */
        int rc = feed_wait(f);
        if (rc) return rc;
        *cur = f->next;
        if (f->have[*cur] != t->param) /* the tensors come in parameter order: never */
            return st_fail(ST_EINVAL, "gguf: tensor %s fetched out of order", t->name);
        int j = i + 1;
        while (j < n && (ts[j].param == t->param || ts[j].ranged)) j++;
        if (j < n) {
            if (f->direct[*cur ^ 1]) writer_drain(w);
            f->direct[*cur ^ 1] = 0;
            feed_start(f, ts[j].param, *cur ^ 1);
        }
    }
    t->src = f->buf[*cur];
    if (t->type == ST_GGML_F32 && !t->permute_heads) f->direct[*cur] = 1;
    return 0;
}

/* One piece buffer per OpenMP thread (none when no tensor is ranged: floats 0). */
static int pieces_alloc(gpieces *pc) {
    if (!pc->floats) return 0;
#ifdef _OPENMP
    pc->n = omp_get_max_threads();
#else
    pc->n = 1;
#endif
    if (!(pc->buf = calloc((size_t)pc->n, sizeof *pc->buf))) return -1;
    for (int k = 0; k < pc->n; k++)
        if (!(pc->buf[k] = malloc(pc->floats * sizeof(float)))) return -1;
    return 0;
}

static void pieces_free(gpieces *pc) {
    for (int k = 0; pc->buf && k < pc->n; k++) free(pc->buf[k]);
    free(pc->buf);
    pc->buf = NULL;
}

/* Writes the file (f at its start). 0, 1 when a write came short (write_atomic names the file), or a
 * negative ST_E* with its message (memory, a fetch). feed: the streamed source, or NULL (ts[i].src set). */
static int write_file(FILE *f, const st_gguf_kv *kv, gtensor *ts, int n, gfeed *feed) {
    st_strbuf h = {0};
    st_strbuf_append(&h, "GGUF", 4);
    st_gguf_put_u32(&h, GGUF_VERSION);
    st_gguf_put_u64(&h, (uint64_t)n);
    st_gguf_put_u64(&h, kv->n);
    st_strbuf_append(&h, kv->b.data, kv->b.len);
    uint64_t off = 0;
    size_t max_floats = 0, max_bytes = CHUNK_BYTES;
    gpieces pieces;
    memset(&pieces, 0, sizeof pieces);
    for (int i = 0; i < n; i++) {
        gtensor *t = &ts[i];
        st_gguf_put_str(&h, t->name, strlen(t->name));
        st_gguf_put_u32(&h, (uint32_t)t->ndim);
        for (int d = 0; d < t->ndim; d++) st_gguf_put_u64(&h, (uint64_t)t->ne[d]);
        st_gguf_put_u32(&h, (uint32_t)t->type);
        st_gguf_put_u64(&h, off);
        t->offset = off;
        size_t bytes = st_ggml_row_bytes(t->type, t->ne[0]) * (size_t)t->ne[1];
        off += align_up(bytes);
        size_t fl = t->permute_heads && t->type == ST_GGML_F32 && !t->ranged ? (size_t)(t->ne[0] * t->ne[1]) : 0;
        size_t row = st_ggml_row_bytes(t->type, t->ne[0]) * (size_t)(t->ranged ? piece_rows(t) : 1);
        if (fl > max_floats) max_floats = fl;
        if (row > max_bytes) max_bytes = row;
        if (t->ranged && (size_t)(piece_rows(t) * t->ne[0]) > pieces.floats)
            pieces.floats = (size_t)(piece_rows(t) * t->ne[0]);
    }
    static const char zeros[GGUF_ALIGN];
    st_strbuf_append(&h, zeros, (size_t)(align_up(h.len) - h.len));
    if (h.failed) {
        st_strbuf_free(&h);
        return st_fail(ST_ENOMEM, "out of memory building the GGUF header");
    }
    int rc = fwrite(h.data, 1, h.len, f) == h.len ? 0 : 1;
    st_strbuf_free(&h);
    float *scratch = malloc(max_floats * sizeof(float) + 1);
    gwriter w;
    memset(&w, 0, sizeof w);
    int nomem = !scratch || pieces_alloc(&pieces);
    if (nomem || writer_start(&w, f, max_bytes)) {
        free(scratch);
        pieces_free(&pieces);
        free(w.s[0].buf);
        free(w.s[1].buf);
        return st_fail(ST_ENOMEM, "out of memory converting tensors");
    }
    int cur = -1;
    for (int i = 0; i < n && rc == 0; i++) {
        if (feed) rc = feed_tensor(feed, &w, ts, n, i, &cur);
        if (!rc) rc = ts[i].ranged ? write_tensor_ranged(&w, &ts[i], feed->m, feed->src, &pieces)
                                   : write_tensor(&w, &ts[i], scratch);
    }
    if (feed && feed->pending) { /* stopped early: let the fetch in flight end (its result is not needed) */
        if (feed->threaded) pthread_join(feed->th, NULL);
        feed->pending = feed->threaded = 0;
    }
    if (writer_finish(&w) && rc == 0) rc = 1;
    free(scratch);
    pieces_free(&pieces);
    return rc;
}

/* Writes the header, metadata and tensors to `path` atomically; rep->bytes set on success. */
static int write_atomic(const char *path, const st_gguf_kv *kv, gtensor *ts, int n, gfeed *feed, st_gguf_report *rep) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.partial", path) >= (int)sizeof tmp) return st_fail(ST_EINVAL, "path too long: %s", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return st_fail(ST_EIO, "cannot create %s", tmp);
    int rc = write_file(f, kv, ts, n, feed);
    if (rc == 1) rc = st_fail(ST_EIO, "write failed on %s (disk full?)", tmp);
    if (!rc && (fflush(f) || fsync(fileno(f)))) rc = st_fail(ST_EIO, "write failed on %s", tmp);
    if (!rc) rep->bytes = (uint64_t)ftell(f);
    if (fclose(f) && !rc) rc = st_fail(ST_EIO, "write failed on %s", tmp);
    if (!rc && rename(tmp, path)) rc = st_fail(ST_EIO, "cannot rename %s to %s", tmp, path);
    if (rc) remove(tmp);
    return rc;
}

/* Marks the tensors the source reads by rows (ranged) and allocates the two fetch buffers: the largest
 * parameter written whole. */
static int feed_alloc(gfeed *feed, const st_model *m, gtensor *ts, int n) {
    size_t most = 1;
    for (int i = 0; i < n; i++) {
        const st_gguf_source *s = feed->src;
        int p = ts[i].param;
        ts[i].ranged = s && s->rows && m->params[p].ndim == 2 && (s->ranged ? s->ranged(s->ctx, m, p) : 1);
        size_t numel = ts[i].ranged ? 0 : m->params[p].numel;
        most = numel > most ? numel : most;
    }
    for (int k = 0; k < 2; k++) {
        feed->have[k] = -1;
        if (!(feed->buf[k] = malloc(most * sizeof(float))))
            return st_fail(ST_ENOMEM, "out of memory: two tensors of %zu floats for the streamed export", most);
    }
    return 0;
}

/* st_gguf_export from host_weights, or (host_weights NULL) from feed. */
static int export_model(const st_model *m, const float *host_weights, gfeed *feed, st_ggml_type quant,
                        const st_gguf_options *opt, const char *path, st_gguf_report *rep) {
    st_gguf_report local;
    if (!rep) rep = &local;
    memset(rep, 0, sizeof *rep);
    gtensor *ts = calloc((size_t)m->n_params + 1, sizeof *ts);
    if (!ts) return st_fail(ST_ENOMEM, "out of memory");
    int n = 0, rc = build_tensors(m, host_weights, quant, ts, &n, &rep->n_fallback);
    st_gguf_kv kv = {{0}, 0};
    if (!rc) model_metadata(&kv, &m->cfg, quant, opt);
    if (!rc && opt && opt->tokenizer_dir)
        rc = st_gguf_add_tokenizer(&kv, opt->tokenizer_dir, opt->tokenizer_pre, &m->cfg, rep);
    if (!rc && kv.b.failed) rc = st_fail(ST_ENOMEM, "out of memory building GGUF metadata");
    if (!rc && feed) rc = feed_alloc(feed, m, ts, n);
    if (!rc) rc = write_atomic(path, &kv, ts, n, feed, rep);
    rep->n_tensors = n;
    st_strbuf_free(&kv.b);
    free(ts);
    return rc;
}

int st_gguf_export(const st_model *m, const float *host_weights, st_ggml_type quant, const st_gguf_options *opt,
                   const char *path, st_gguf_report *rep) {
    if (!host_weights) return st_fail(ST_EINVAL, "gguf: no weights given");
    return export_model(m, host_weights, NULL, quant, opt, path, rep);
}

int st_gguf_export_source(const st_model *m, const st_gguf_source *src, st_ggml_type quant, const st_gguf_options *opt,
                          const char *path, st_gguf_report *rep) {
    if (!src || !src->fetch) return st_fail(ST_EINVAL, "gguf: no source given");
    gfeed feed;
    memset(&feed, 0, sizeof feed);
    feed.m = m;
    feed.fetch = src->fetch;
    feed.ctx = src->ctx;
    feed.src = src;
    int rc = export_model(m, NULL, &feed, quant, opt, path, rep);
    free(feed.buf[0]);
    free(feed.buf[1]);
    return rc;
}

int st_gguf_export_streamed(const st_model *m, st_model_fetch_fn fetch, void *ctx, st_ggml_type quant,
                            const st_gguf_options *opt, const char *path, st_gguf_report *rep) {
    st_gguf_source src = {fetch, NULL, NULL, ctx};
    return st_gguf_export_source(m, &src, quant, opt, path, rep);
}

/* ---------------- LoRA adapters ---------------- */

/* One lora_a / lora_b tensor per adapter matrix, named after the base tensor's GGUF name. A [r, in] and
 * B [out, r] are stored as they are (ne = [in, r] and [r, out], what llama.cpp's loader checks against
 * the base tensor); B of a `llama` q/k projection gets the base weight's row permutation, since
 * (P W) + s (P B) A = P (W + s B A): the adapter then adds to the permuted base exactly what it adds to
 * the HF weight (convert_lora_to_gguf.py applies LlamaModel.permute to lora_b alone for this reason). */
static int build_lora_tensors(const st_model *m, const float *w, st_ggml_type quant, gtensor *ts, int *n,
                              int *fallback) {
    const st_model_config *c = &m->cfg;
    int llama_arch = c->family == ST_FAMILY_LLAMA && strcmp(arch_of(c), "llama") == 0;
    int k = 0, rc;
    for (int i = 0; i < m->n_params; i++) {
        int is_b = 0, base = st_lora_base_of(m, i, &is_b);
        if (base < 0) continue;
        const st_param *p = &m->params[i], *bp = &m->params[base];
        gtensor *t = &ts[k++];
        memset(t, 0, sizeof *t);
        char bn[56]; /* + ".lora_a" within ggml's 64-byte tensor names */
        if ((rc = gguf_name(bp->name, bn, sizeof bn))) return rc;
        snprintf(t->name, sizeof t->name, "%s.lora_%c", bn, is_b ? 'b' : 'a');
        t->ndim = 2;
        t->ne[0] = p->shape[1];
        t->ne[1] = p->shape[0];
        t->src = w ? w + p->offset : NULL;
        t->param = i;
        if (llama_arch && is_b && is_suffix(bp->name, "q_proj.weight")) t->permute_heads = c->n_head;
        if (llama_arch && is_b && is_suffix(bp->name, "k_proj.weight")) t->permute_heads = c->n_kv_head;
        t->type = pick_type(t, quant, 0, c->n_layer, fallback);
    }
    *n = k;
    return 0;
}

/* st_gguf_export_lora from host_weights, or (host_weights NULL) from feed. */
static int export_lora(const st_model *m, const float *host_weights, gfeed *feed, st_ggml_type quant,
                       const st_gguf_options *opt, const char *path, st_gguf_report *rep) {
    st_gguf_report local;
    if (!rep) rep = &local;
    memset(rep, 0, sizeof *rep);
    st_lora_spec spec;
    int rc = st_lora_spec_of(m, &spec);
    if (rc) return st_fail(ST_EINVAL, "gguf: the model has no LoRA adapters to export");
    if (spec.dora)
        return st_fail(ST_ECONFIG, "gguf: DoRA adapters (use_dora) have no GGUF LoRA form (llama.cpp applies "
                       "W + s B A only); export the merged model instead");
    if (quant == ST_GGUF_MIX_Q4_K_M || quant == ST_GGUF_MIX_Q5_K_M)
        return st_fail(ST_EINVAL, "gguf: --quant %s is a mix for models (per-layer rules for attn_v / ffn_down); a "
                       "LoRA adapter takes one type: f32, f16, bf16, q8_0, q4_0 or q2_K..q6_K",
                       st_ggml_type_name(quant));
    if (st_lora_scale(m) == 0.0) /* llama.cpp reads alpha 0 as "unscaled" (scale 1), not as scale 0 */
        return st_fail(ST_ECONFIG, "gguf: lora_alpha 0 has no GGUF LoRA form (llama.cpp applies alpha 0 as "
                       "scale 1)");
    gtensor *ts = calloc((size_t)m->n_params + 1, sizeof *ts);
    if (!ts) return st_fail(ST_ENOMEM, "out of memory");
    int n = 0;
    rc = build_lora_tensors(m, host_weights, quant, ts, &n, &rep->n_fallback);
    st_gguf_kv kv = {{0}, 0};
    if (!rc) {
        st_gguf_kv_str(&kv, "general.architecture", arch_of(&m->cfg));
        st_gguf_kv_str(&kv, "general.type", "adapter");
        if (opt && opt->name) st_gguf_kv_str(&kv, "general.name", opt->name);
        st_gguf_kv_u32(&kv, "general.alignment", GGUF_ALIGN);
        st_gguf_kv_u32(&kv, "general.file_type", file_type(quant));
        st_gguf_kv_u32(&kv, "general.quantization_version", 2);
        st_gguf_kv_str(&kv, "adapter.type", "lora");
        /* llama.cpp scales by alpha / rank (rank = lora_b's ne[0]); alpha = scale * r keeps rsLoRA's
         * alpha / sqrt(r) exact too */
        st_gguf_kv_f32(&kv, "adapter.lora.alpha", (float)(st_lora_scale(m) * st_lora_rank(m)));
        if (kv.b.failed) rc = st_fail(ST_ENOMEM, "out of memory building GGUF metadata");
    }
    if (!rc && feed) rc = feed_alloc(feed, m, ts, n);
    if (!rc) rc = write_atomic(path, &kv, ts, n, feed, rep);
    rep->n_tensors = n;
    st_strbuf_free(&kv.b);
    free(ts);
    return rc;
}

int st_gguf_export_lora(const st_model *m, const float *host_weights, st_ggml_type quant, const st_gguf_options *opt,
                        const char *path, st_gguf_report *rep) {
    if (!host_weights) return st_fail(ST_EINVAL, "gguf: no weights given");
    return export_lora(m, host_weights, NULL, quant, opt, path, rep);
}

int st_gguf_export_lora_streamed(const st_model *m, st_model_fetch_fn fetch, void *ctx, st_ggml_type quant,
                                 const st_gguf_options *opt, const char *path, st_gguf_report *rep) {
    gfeed feed;
    memset(&feed, 0, sizeof feed);
    feed.m = m;
    feed.fetch = fetch;
    feed.ctx = ctx;
    int rc = export_lora(m, NULL, &feed, quant, opt, path, rep);
    free(feed.buf[0]);
    free(feed.buf[1]);
    return rc;
}
