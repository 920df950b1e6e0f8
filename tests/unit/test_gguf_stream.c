/* test_gguf_stream.c — the streamed GGUF export (st_gguf_export_streamed: a helper thread fetches the next
 * tensor while the current one is encoded and written, what `export --format gguf` runs for a model
 * directory or a checkpoint) writes exactly the bytes of the export from the weights in memory
 * (st_gguf_export), for a Llama model (q/k row permutation, f32 tensors written straight from the fetch
 * buffers) and a tied GPT-2 (its output.weight is a second tensor from the embedding's one fetch), in f32 /
 * f16 / bf16 / q8_0 / q4_0 / q4_K / q6_K, fetched from memory and from a saved model directory (safetensors
 * reads, GPT-2's transposed Conv1D tensors); fetch is called once per parameter in increasing order; a
 * failing fetch fails the export with that fetch's own message (it ran on another thread) and leaves no
 * file (neither PATH nor PATH.partial).
 * The ranged source (st_gguf_export_source: 2-D tensors read a piece of rows at a time on the OpenMP threads,
 * what `export` runs for a model directory) writes the same bytes too, over shapes that take several pieces
 * and chunks, permuted heads larger than a piece, rows that fit no block (f16 / q5_0 fallbacks), every
 * quant incl. q2_K..q6_K and the mixes; every row is read exactly once; a failing rows() call fails the
 * export with its own message (it ran on an OpenMP thread) and leaves no file. The streamed LoRA adapter export
 * (st_gguf_export_lora_streamed: only the adapters fetched) writes the bytes of st_gguf_export_lora. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoints/gguf.h"
#include "checkpoints/model_dir.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "common/util.h"
#include "kernels/kernels.h"
#include "worker/lora.h"

#include "test_tmpdir.h"

static const char *LLAMA =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"intermediate_size\": 256,"
    " \"max_position_embeddings\": 64, \"model_type\": \"llama\", \"num_attention_heads\": 4,"
    " \"num_hidden_layers\": 2, \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": false, \"vocab_size\": 96}";
static const char *GPT2 =
    "{\"architectures\": [\"GPT2LMHeadModel\"], \"layer_norm_epsilon\": 1e-05, \"model_type\": \"gpt2\","
    " \"n_ctx\": 64, \"n_embd\": 256, \"n_head\": 4, \"n_layer\": 2, \"n_positions\": 64, \"vocab_size\": 96}";

/* The fetch from memory, recording the order it is called in. */
typedef struct {
    const float *w;
    int calls, last, bad_order, fail_at;
} mem_src;

static int fetch_mem(void *ctx, const st_model *m, int i, float *dst) {
    mem_src *s = ctx;
    s->calls++;
    if (i <= s->last) s->bad_order = 1;
    s->last = i;
    if (i == s->fail_at) return st_fail(ST_EFORMAT, "tensor %s: bytes 12-16 unreadable (test)", m->params[i].name);
    memcpy(dst, s->w + m->params[i].offset, m->params[i].numel * sizeof(float));
    return 0;
}

typedef struct {
    st_safetensors *st;
} dir_src;

static int fetch_dir(void *ctx, const st_model *m, int i, float *dst) {
    return st_model_read_param(((dir_src *)ctx)->st, m, i, dst);
}

/* The model directory's ranged read, as cmd_export_gguf.c's rows_source (a transposed tensor: whole). */
static int st_test_rows_dir(void *ctx, const st_model *m, int i, int64_t r0, int64_t n, float *dst) {
    size_t cols = (size_t)m->params[i].shape[1];
    return st_model_read_param_range(((dir_src *)ctx)->st, m, i, (size_t)r0 * cols, (size_t)n * cols, dst);
}

static int st_test_ranged_dir(void *ctx, const st_model *m, int i) {
    (void)ctx;
    return !m->params[i].transpose_io;
}

static void build(const char *json, st_model *m) {
    st_model_config c;
    if (st_model_config_parse(json, strlen(json), "test", &c) || st_model_build(m, &c, st_backend_cpu(1)) ||
        st_model_init_random(m, 7))
        fail_msg("model: %s", st_error());
}

static void same_file(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    assert_int_equal(st_read_file(a, &x, &nx), 0);
    assert_int_equal(st_read_file(b, &y, &ny), 0);
    assert_int_equal(nx, ny);
    assert_true(nx > 0);
    if (memcmp(x, y, nx)) {
        size_t k = 0;
        while (x[k] == y[k]) k++;
        fail_msg("%s and %s differ at byte %zu of %zu", a, b, k, nx);
    }
    free(x);
    free(y);
}

static const char *const QUANTS[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_K", "q6_K"};
static const char *const ALL_QUANTS[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q2_K", "q3_K",
                                         "q4_K", "q5_K", "q6_K", "q4_K_M", "q5_K_M"};

/* hidden 80 (heads of 20 rows): rows of 80 fit no 32-block (f16 under every quant); ffn 288: q5_0 under q4_K */
static const char *LLAMA_ODD =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 80, \"intermediate_size\": 288,"
    " \"max_position_embeddings\": 64, \"model_type\": \"llama\", \"num_attention_heads\": 4,"
    " \"num_hidden_layers\": 2, \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": true, \"vocab_size\": 97}";
/* heads of 256 rows of 512 (a head is 4 pieces' worth: one piece), a 615K-value embedding (several chunks in f32 / f16 / bf16),
 * ffn 320 (q5_0 / q5_1 / q8_0 fallbacks under the k-quants) */
static const char *LLAMA_WIDE =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 512, \"intermediate_size\": 320,"
    " \"max_position_embeddings\": 64, \"model_type\": \"llama\", \"num_attention_heads\": 2,"
    " \"num_hidden_layers\": 1, \"num_key_value_heads\": 1, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": false, \"vocab_size\": 1201}";

/* The ranged source from memory: rows() copies rows (counting how many times each is read), fetch the rest. */
typedef struct {
    const float *w;
    int fetches, fail_param;
    int64_t fail_row;
    int *reads[64]; /* per parameter: times each row was read */
    int mask;       /* parameters 0..31 set here are read whole (fetch), not ranged */
} rows_src;

static int rows_fetch(void *ctx, const st_model *m, int i, float *dst) {
    rows_src *s = ctx;
    s->fetches++;
    memcpy(dst, s->w + m->params[i].offset, m->params[i].numel * sizeof(float));
    return 0;
}

static int rows_read(void *ctx, const st_model *m, int i, int64_t r0, int64_t n, float *dst) {
    rows_src *s = ctx;
    const st_param *p = &m->params[i];
    if (i == s->fail_param && r0 <= s->fail_row && s->fail_row < r0 + n)
        return st_fail(ST_EFORMAT, "tensor %s: row %lld unreadable (test)", p->name, (long long)s->fail_row);
    for (int64_t r = r0; r < r0 + n; r++) {
#pragma omp atomic
        s->reads[i][r]++;
    }
    memcpy(dst, s->w + p->offset + r0 * p->shape[1], (size_t)(n * p->shape[1]) * sizeof(float));
    return 0;
}

static int rows_ranged(void *ctx, const st_model *m, int i) {
    (void)m;
    return !(i < 32 && (((rows_src *)ctx)->mask >> i) & 1);
}

static void rows_reset(rows_src *s, const st_model *m) {
    for (int i = 0; i < m->n_params && i < 64; i++) memset(s->reads[i], 0, (size_t)m->params[i].shape[0] * sizeof(int));
    s->fetches = 0;
}

/* Every quant: the ranged export (from memory, all 2-D tensors ranged or some whole; from the saved model
 * directory's safetensors) equals the export from the weights; each ranged row read once per tensor written. */
static void check_ranged(const char *json, int tied_twice) {
    st_model m;
    build(json, &m);
    assert_true(m.n_params <= 64);
    char dir[512], a[600], b[600];
    snprintf(dir, sizeof dir, "%s/model_r", st_test_dir);
    assert_int_equal(st_model_save_dir(&m, dir, 0), 0);
    st_model d;
    dir_src ds = {NULL};
    if (st_model_open_dir(dir, st_backend_cpu(1), &d) || st_model_check_files(&d, dir, &ds.st))
        fail_msg("open %s: %s", dir, st_error());
    rows_src rs;
    memset(&rs, 0, sizeof rs);
    rs.w = m.weights;
    rs.fail_param = -1;
    for (int i = 0; i < m.n_params; i++) assert_non_null(rs.reads[i] = calloc((size_t)m.params[i].shape[0], sizeof(int)));
    for (size_t q = 0; q < sizeof ALL_QUANTS / sizeof ALL_QUANTS[0]; q++) {
        st_ggml_type t;
        assert_int_equal(st_ggml_type_parse(ALL_QUANTS[q], &t), 0);
        snprintf(a, sizeof a, "%s/mem.%s.gguf", st_test_dir, ALL_QUANTS[q]);
        st_gguf_report ra, rb;
        if (st_gguf_export(&m, m.weights, t, NULL, a, &ra)) fail_msg("export: %s", st_error());
        for (int way = 0; way < 3; way++) {
            snprintf(b, sizeof b, "%s/ranged%d.%s.gguf", st_test_dir, way, ALL_QUANTS[q]);
            rows_reset(&rs, &m);
            rs.mask = way == 1 ? 0x15 : 0; /* way 1: the embedding and two more read whole */
            st_gguf_source src = {rows_fetch, rows_read, rows_ranged, &rs};
            if (way == 2) src = (st_gguf_source){fetch_dir, st_test_rows_dir, st_test_ranged_dir, &ds};
            if (st_gguf_export_source(way == 2 ? &d : &m, &src, t, NULL, b, &rb))
                fail_msg("ranged %d %s: %s", way, ALL_QUANTS[q], st_error());
            assert_int_equal(ra.n_tensors, rb.n_tensors);
            assert_int_equal(ra.n_fallback, rb.n_fallback);
            same_file(a, b);
            unlink(b);
            if (way == 2) continue;
            int whole = 0;
            for (int i = 0; i < m.n_params; i++) {
                const st_param *p = &m.params[i];
                int ranged = p->ndim == 2 && rows_ranged(&rs, &m, i);
                whole += !ranged;
                /* GPT-2's tied wte is written twice (token_embd, output); llama's tied one once */
                for (int64_t r = 0; r < p->shape[0]; r++)
                    if (rs.reads[i][r] != (ranged ? 1 + (tied_twice && i == 0) : 0)) fail_msg("%s row %lld read %d times (%s, way %d)",
                                                                    p->name, (long long)r, rs.reads[i][r], ALL_QUANTS[q], way);
            }
            assert_int_equal(rs.fetches, whole);
        }
        unlink(a);
    }
    for (int i = 0; i < m.n_params; i++) free(rs.reads[i]);
    st_safetensors_close(ds.st);
    st_model_free(&d);
    st_model_free(&m);
}

/* Every quant: the streamed export from memory and (a saved f32 model directory) from files equals the
 * export from the weights. */
static void check_model(const char *json) {
    st_model m;
    build(json, &m);
    char dir[512], a[600], b[600], c[600];
    snprintf(dir, sizeof dir, "%s/model", st_test_dir);
    assert_int_equal(st_model_save_dir(&m, dir, 0), 0);
    st_model d;
    dir_src ds = {NULL};
    if (st_model_open_dir(dir, st_backend_cpu(1), &d) || st_model_check_files(&d, dir, &ds.st))
        fail_msg("open %s: %s", dir, st_error());
    for (size_t q = 0; q < sizeof QUANTS / sizeof QUANTS[0]; q++) {
        st_ggml_type t;
        assert_int_equal(st_ggml_type_parse(QUANTS[q], &t), 0);
        snprintf(a, sizeof a, "%s/mem.%s.gguf", st_test_dir, QUANTS[q]);
        snprintf(b, sizeof b, "%s/stream.%s.gguf", st_test_dir, QUANTS[q]);
        snprintf(c, sizeof c, "%s/dir.%s.gguf", st_test_dir, QUANTS[q]);
        st_gguf_report ra, rb, rr;
        if (st_gguf_export(&m, m.weights, t, NULL, a, &ra)) fail_msg("export: %s", st_error());
        mem_src s = {m.weights, 0, -1, 0, -1};
        if (st_gguf_export_streamed(&m, fetch_mem, &s, t, NULL, b, &rb)) fail_msg("streamed: %s", st_error());
        assert_int_equal(s.calls, m.n_params);
        assert_false(s.bad_order);
        if (st_gguf_export_streamed(&d, fetch_dir, &ds, t, NULL, c, &rr)) fail_msg("from dir: %s", st_error());
        assert_int_equal(ra.n_tensors, rb.n_tensors);
        assert_int_equal(ra.n_fallback, rb.n_fallback);
        same_file(a, b);
        same_file(a, c);
        unlink(a);
        unlink(b);
        unlink(c);
    }
    st_safetensors_close(ds.st);
    st_model_free(&d);
    st_model_free(&m);
}

static void test_llama_streamed_same_bytes(void **state) {
    (void)state;
    check_model(LLAMA);
}

static void test_gpt2_tied_streamed_same_bytes(void **state) {
    (void)state;
    check_model(GPT2);
}

/* A fetch failing at parameter 3: its message, no further fetch, no file left. */
static void test_fetch_failure(void **state) {
    (void)state;
    st_model m;
    build(LLAMA, &m);
    char p[600], partial[700];
    snprintf(p, sizeof p, "%s/fail.gguf", st_test_dir);
    snprintf(partial, sizeof partial, "%s.partial", p);
    for (int q = 0; q < 2; q++) {
        mem_src s = {m.weights, 0, -1, 0, 3};
        int rc = st_gguf_export_streamed(&m, fetch_mem, &s, q ? ST_GGML_Q4_0 : ST_GGML_F32, NULL, p, NULL);
        assert_int_equal(rc, ST_EFORMAT);
        if (!strstr(st_error(), "bytes 12-16 unreadable (test)") || !strstr(st_error(), m.params[3].name))
            fail_msg("message: %s", st_error());
        assert_int_equal(s.calls, 4);
        assert_int_not_equal(access(p, F_OK), 0);
        assert_int_not_equal(access(partial, F_OK), 0);
    }
    st_model_free(&m);
}

static void test_ranged_llama_same_bytes(void **state) {
    (void)state;
    check_ranged(LLAMA, 0);
}

static void test_ranged_gpt2_same_bytes(void **state) {
    (void)state;
    check_ranged(GPT2, 1);
}

static void test_ranged_odd_rows_same_bytes(void **state) {
    (void)state;
    check_ranged(LLAMA_ODD, 0);
}

static void test_ranged_wide_same_bytes(void **state) {
    (void)state;
    check_ranged(LLAMA_WIDE, 0);
}

/* A rows() call failing inside a tensor (on an OpenMP thread): its message, no file left. */
static void test_rows_failure(void **state) {
    (void)state;
    st_model m;
    build(LLAMA_WIDE, &m);
    char p[600], partial[700];
    snprintf(p, sizeof p, "%s/fail_r.gguf", st_test_dir);
    snprintf(partial, sizeof partial, "%s.partial", p);
    rows_src rs;
    memset(&rs, 0, sizeof rs);
    rs.w = m.weights;
    for (int i = 0; i < m.n_params; i++) assert_non_null(rs.reads[i] = calloc((size_t)m.params[i].shape[0], sizeof(int)));
    rs.fail_param = 0; /* the embedding: 1201 rows, several chunks in f32 */
    rs.fail_row = 1000;
    st_gguf_source src = {rows_fetch, rows_read, NULL, &rs};
    for (int q = 0; q < 2; q++) {
        int rc = st_gguf_export_source(&m, &src, q ? ST_GGML_Q4_0 : ST_GGML_F32, NULL, p, NULL);
        assert_int_equal(rc, ST_EFORMAT);
        if (!strstr(st_error(), "row 1000 unreadable (test)") || !strstr(st_error(), m.params[0].name))
            fail_msg("message: %s", st_error());
        assert_int_not_equal(access(p, F_OK), 0);
        assert_int_not_equal(access(partial, F_OK), 0);
    }
    for (int i = 0; i < m.n_params; i++) free(rs.reads[i]);
    st_model_free(&m);
}

/* LoRA adapters (random A and B, every target, llama with permuted lora_b and GPT-2's Conv1D): the streamed
 * export fetches only the adapter parameters, in order, and writes the in-memory export's bytes. */
static void check_lora(const char *json, unsigned targets) {
    st_model m;
    st_model_config c;
    if (st_model_config_parse(json, strlen(json), "test", &c) || st_model_build(&m, &c, st_backend_cpu(1)))
        fail_msg("model: %s", st_error());
    st_lora_spec spec = {.r = 8, .alpha = 16, .targets = targets, .seed = 3};
    if (st_lora_attach(&m, &spec) || st_model_init_random(&m, 11)) fail_msg("lora: %s", st_error());
    int n_adapter = 0;
    for (int i = 0; i < m.n_params; i++) {
        int is_b = 0;
        n_adapter += st_lora_base_of(&m, i, &is_b) >= 0;
    }
    char a[600], b[600];
    for (size_t q = 0; q < sizeof ALL_QUANTS / sizeof ALL_QUANTS[0] - 2; q++) { /* not the mixes */
        st_ggml_type t;
        assert_int_equal(st_ggml_type_parse(ALL_QUANTS[q], &t), 0);
        snprintf(a, sizeof a, "%s/lora.%s.gguf", st_test_dir, ALL_QUANTS[q]);
        snprintf(b, sizeof b, "%s/lora_s.%s.gguf", st_test_dir, ALL_QUANTS[q]);
        st_gguf_report ra, rb;
        if (st_gguf_export_lora(&m, m.weights, t, NULL, a, &ra)) fail_msg("lora export: %s", st_error());
        mem_src s = {m.weights, 0, -1, 0, -1};
        if (st_gguf_export_lora_streamed(&m, fetch_mem, &s, t, NULL, b, &rb)) fail_msg("streamed: %s", st_error());
        assert_int_equal(s.calls, n_adapter);
        assert_false(s.bad_order);
        assert_int_equal(ra.n_tensors, n_adapter);
        assert_int_equal(ra.n_tensors, rb.n_tensors);
        assert_int_equal(ra.n_fallback, rb.n_fallback);
        same_file(a, b);
        unlink(a);
        unlink(b);
    }
    st_model_free(&m);
}

static void test_lora_streamed_same_bytes(void **state) {
    (void)state;
    check_lora(LLAMA, ST_LORA_LLAMA_ALL);
    check_lora(GPT2, ST_LORA_GPT2_ALL);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama_streamed_same_bytes),
                                       cmocka_unit_test(test_gpt2_tied_streamed_same_bytes),
                                       cmocka_unit_test(test_fetch_failure),
                                       cmocka_unit_test(test_ranged_llama_same_bytes),
                                       cmocka_unit_test(test_ranged_gpt2_same_bytes),
                                       cmocka_unit_test(test_ranged_odd_rows_same_bytes),
                                       cmocka_unit_test(test_ranged_wide_same_bytes),
                                       cmocka_unit_test(test_rows_failure),
                                       cmocka_unit_test(test_lora_streamed_same_bytes)};
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
