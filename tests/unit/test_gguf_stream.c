/* test_gguf_stream.c — the streamed GGUF export (st_gguf_export_streamed: a helper thread fetches the next
 * tensor while the current one is encoded and written, what `export --format gguf` runs for a model
 * directory or a checkpoint) writes exactly the bytes of the export from the weights in memory
 * (st_gguf_export), for a Llama model (q/k row permutation, f32 tensors written straight from the fetch
 * buffers) and a tied GPT-2 (its output.weight is a second tensor from the embedding's one fetch), in f32 /
 * f16 / bf16 / q8_0 / q4_0 / q4_K / q6_K, fetched from memory and from a saved model directory (safetensors
 * reads, GPT-2's transposed Conv1D tensors); fetch is called once per parameter in increasing order; a
 * failing fetch fails the export with that fetch's own message (it ran on another thread) and leaves no
 * file (neither PATH nor PATH.partial). */
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

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama_streamed_same_bytes),
                                       cmocka_unit_test(test_gpt2_tied_streamed_same_bytes),
                                       cmocka_unit_test(test_fetch_failure)};
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
