/* test_model_dir.c — config.json reading of hand-written HF-style GPT-2 / Llama / Qwen2 / Mistral configs
 * (values as published for gpt2, TinyLlama-1.1B, Qwen2-0.5B, Mistral-7B-v0.1), the errors for unsupported or
 * invalid settings, and write -> read round trips that transformers-style JSON parsing accepts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_dir.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"

#include "test_tmpdir.h"

static void put_config(const char *json) {
    char p[512];
    snprintf(p, sizeof p, "%s/config.json", st_test_dir);
    assert_int_equal(st_write_file_atomic(p, json, strlen(json)), 0);
}

static st_model_config read_ok(const char *json) {
    put_config(json);
    st_model_config c;
    memset(&c, 0xAB, sizeof c);
    int rc = st_model_config_read(st_test_dir, &c);
    if (rc) fail_msg("read failed: %s", st_error());
    return c;
}

static void read_err(const char *json, const char *frag) {
    put_config(json);
    st_model_config c;
    int rc = st_model_config_read(st_test_dir, &c);
    assert_true(rc < 0);
    if (!strstr(st_error(), frag) || !strstr(st_error(), "config.json"))
        fail_msg("message '%s' lacks '%s' or the file name", st_error(), frag);
}

static const char *GPT2 =
    "{\"activation_function\": \"gelu_new\", \"architectures\": [\"GPT2LMHeadModel\"], \"attn_pdrop\": 0.1,"
    " \"bos_token_id\": 50256, \"embd_pdrop\": 0.1, \"eos_token_id\": 50256, \"initializer_range\": 0.02,"
    " \"layer_norm_epsilon\": 1e-05, \"model_type\": \"gpt2\", \"n_ctx\": 1024, \"n_embd\": 768, \"n_head\": 12,"
    " \"n_layer\": 12, \"n_positions\": 1024, \"resid_pdrop\": 0.1, \"summary_activation\": null,"
    " \"task_specific_params\": {\"text-generation\": {\"do_sample\": true, \"max_length\": 50}}, \"vocab_size\": 50257}";

static const char *TINYLLAMA =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"bos_token_id\": 1, \"eos_token_id\": 2,"
    " \"hidden_act\": \"silu\", \"hidden_size\": 2048, \"initializer_range\": 0.02, \"intermediate_size\": 5632,"
    " \"max_position_embeddings\": 2048, \"model_type\": \"llama\", \"num_attention_heads\": 32,"
    " \"num_hidden_layers\": 22, \"num_key_value_heads\": 4, \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05,"
    " \"rope_scaling\": null, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
    " \"use_cache\": true, \"vocab_size\": 32000}";

static const char *QWEN2 =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0, \"bos_token_id\": 151643,"
    " \"eos_token_id\": 151643, \"hidden_act\": \"silu\", \"hidden_size\": 896, \"initializer_range\": 0.02,"
    " \"intermediate_size\": 4864, \"max_position_embeddings\": 131072, \"max_window_layers\": 24,"
    " \"model_type\": \"qwen2\", \"num_attention_heads\": 14, \"num_hidden_layers\": 24, \"num_key_value_heads\": 2,"
    " \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, \"sliding_window\": 131072, \"tie_word_embeddings\": true,"
    " \"torch_dtype\": \"bfloat16\", \"use_cache\": true, \"use_sliding_window\": false, \"vocab_size\": 151936}";

static const char *MISTRAL =
    "{\"architectures\": [\"MistralForCausalLM\"], \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\","
    " \"hidden_size\": 4096, \"initializer_range\": 0.02, \"intermediate_size\": 14336,"
    " \"max_position_embeddings\": 32768, \"model_type\": \"mistral\", \"num_attention_heads\": 32,"
    " \"num_hidden_layers\": 32, \"num_key_value_heads\": 8, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0,"
    " \"sliding_window\": 4096, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\", \"vocab_size\": 32000}";

static void test_gpt2(void **state) {
    (void)state;
    st_model_config c = read_ok(GPT2);
    assert_int_equal(c.family, ST_FAMILY_GPT2);
    assert_string_equal(c.model_type, "gpt2");
    assert_int_equal(c.n_layer, 12);
    assert_int_equal(c.d_model, 768);
    assert_int_equal(c.n_head, 12);
    assert_int_equal(c.n_kv_head, 12);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.d_ff, 3072); /* n_inner absent -> 4 * n_embd */
    assert_int_equal(c.vocab, 50257);
    assert_int_equal(c.max_seq, 1024);
    assert_true(c.norm_eps == 1e-5f);
    assert_int_equal(c.tied_embeddings, 1);
    assert_int_equal(c.qkv_bias, 1);
    assert_int_equal(c.bos_id, 50256);
    assert_int_equal(c.eos_id, 50256);
    /* n_ctx alone, explicit n_inner, gelu_pytorch_tanh, untied */
    c = read_ok("{\"model_type\":\"gpt2\",\"n_embd\":64,\"n_layer\":2,\"n_head\":4,\"n_ctx\":128,\"n_inner\":100,"
                "\"vocab_size\":300,\"activation_function\":\"gelu_pytorch_tanh\",\"tie_word_embeddings\":false}");
    assert_int_equal(c.max_seq, 128);
    assert_int_equal(c.d_ff, 100);
    assert_int_equal(c.tied_embeddings, 0);
    assert_int_equal(c.bos_id, -1);
    assert_true(c.norm_eps == 1e-5f);
}

static void test_llama_family(void **state) {
    (void)state;
    st_model_config c = read_ok(TINYLLAMA);
    assert_int_equal(c.family, ST_FAMILY_LLAMA);
    assert_string_equal(c.model_type, "llama");
    assert_int_equal(c.d_model, 2048);
    assert_int_equal(c.d_ff, 5632);
    assert_int_equal(c.n_layer, 22);
    assert_int_equal(c.n_head, 32);
    assert_int_equal(c.n_kv_head, 4);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.max_seq, 2048);
    assert_int_equal(c.vocab, 32000);
    assert_true(c.norm_eps == 1e-5f);
    assert_true(c.rope_theta == 10000.0f);
    assert_int_equal(c.tied_embeddings, 0);
    assert_int_equal(c.qkv_bias, 0);
    assert_int_equal(c.bos_id, 1);
    assert_int_equal(c.eos_id, 2);

    c = read_ok(QWEN2);
    assert_string_equal(c.model_type, "qwen2");
    assert_int_equal(c.family, ST_FAMILY_LLAMA);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.n_kv_head, 2);
    assert_int_equal(c.qkv_bias, 1);
    assert_int_equal(c.tied_embeddings, 1);
    assert_int_equal(c.max_seq, 131072);
    assert_true(c.rope_theta == 1e6f);
    assert_true(c.norm_eps == 1e-6f);

    c = read_ok(MISTRAL);
    assert_string_equal(c.model_type, "mistral");
    assert_int_equal(c.n_kv_head, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.max_seq, 32768);
    assert_int_equal(c.sliding_window, 4096); /* kept: seq_len beyond it is refused by the model */
    assert_string_equal(c.dtype, "bfloat16");
    assert_int_equal(c.qkv_bias, 0);

    /* defaults: kv heads = heads, rope_theta 10000, untied, rms eps 1e-6; eos may be a list (Llama 3) */
    c = read_ok("{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2,"
                "\"num_attention_heads\":4,\"max_position_embeddings\":256,\"vocab_size\":500,"
                "\"bos_token_id\":128000,\"eos_token_id\":[128001,128008,128009]}");
    assert_int_equal(c.n_kv_head, 4);
    assert_int_equal(c.head_dim, 16);
    assert_true(c.rope_theta == 10000.0f);
    assert_true(c.norm_eps == 1e-6f);
    assert_int_equal(c.tied_embeddings, 0);
    assert_int_equal(c.bos_id, 128000);
    assert_int_equal(c.eos_id, 128001);
    /* explicit head_dim that is not hidden/heads */
    c = read_ok("{\"model_type\":\"llama\",\"hidden_size\":60,\"intermediate_size\":160,\"num_hidden_layers\":2,"
                "\"num_attention_heads\":4,\"head_dim\":32,\"max_position_embeddings\":256,\"vocab_size\":500}");
    assert_int_equal(c.head_dim, 32);
}

#define LLAMA_BASE "\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2," \
                   "\"max_position_embeddings\":256,\"vocab_size\":500"
#define GPT2_BASE "\"model_type\":\"gpt2\",\"n_layer\":2,\"n_positions\":128,\"vocab_size\":300"

static void test_errors(void **state) {
    (void)state;
    read_err("{" GPT2_BASE ",\"n_embd\":64}", "missing key 'n_head'");
    read_err("{" GPT2_BASE ",\"n_embd\":64,\"n_head\":0}", "key 'n_head' = 0 must be a positive integer");
    read_err("{" GPT2_BASE ",\"n_embd\":64,\"n_head\":5}", "key 'n_head' = 5 does not divide n_embd = 64");
    read_err("{" GPT2_BASE ",\"n_embd\":\"64\",\"n_head\":4}", "key 'n_embd' must be an integer");
    read_err("{" GPT2_BASE ",\"n_embd\":64.5,\"n_head\":4}", "key 'n_embd' must be an integer");
    read_err("{" GPT2_BASE ",\"n_embd\":64,\"n_head\":4,\"activation_function\":\"relu\"}",
             "activation_function 'relu' is not supported");
    read_err("{" GPT2_BASE ",\"n_embd\":64,\"n_head\":4,\"layer_norm_epsilon\":-1}", "key 'layer_norm_epsilon' must be a positive number");
    read_err("{" GPT2_BASE ",\"n_embd\":64,\"n_head\":4,\"scale_attn_by_inverse_layer_idx\":true}",
             "scale_attn_by_inverse_layer_idx");
    read_err("{\"model_type\":\"gpt2\",\"n_layer\":2,\"vocab_size\":300,\"n_embd\":64,\"n_head\":4}", "missing key 'n_positions'");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"num_key_value_heads\":3}",
             "n_head = 4 is not a multiple of n_kv_head = 3");
}

static void test_errors_llama(void **state) {
    (void)state;
    read_err("{\"model_type\":\"llama\",\"hidden_size\":96,\"intermediate_size\":160,\"num_hidden_layers\":2,"
             "\"max_position_embeddings\":256,\"vocab_size\":500,\"num_attention_heads\":32}",
             "head_dim = 3 must be even for RoPE");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":5}", "key 'num_attention_heads' = 5 does not divide hidden_size = 64");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"attention_bias\":true}", "key 'attention_bias' = true is not supported");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"hidden_act\":\"gelu\"}", "hidden_act 'gelu' is not supported");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_theta\":0}", "key 'rope_theta' must be a positive number");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"eos_token_id\":-3}", "key 'eos_token_id'");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"tie_word_embeddings\":1}", "key 'tie_word_embeddings' must be true or false");
    read_err("{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
             "\"max_position_embeddings\":256,\"vocab_size\":500}", "missing key 'intermediate_size'");
    read_err("{\"model_type\":\"bert\",\"hidden_size\":64}", "model_type 'bert' is not supported");
    read_err("{\"hidden_size\":64}", "missing key 'model_type'");
    read_err("{\"model_type\": \"llama\",", "invalid JSON");
    read_err("[1]", "not a JSON object");
    st_model_config c;
    assert_int_equal(st_model_config_read("/nonexistent/dir", &c), ST_EIO);
    assert_non_null(strstr(st_error(), "/nonexistent/dir/config.json"));
}

/* Both generations of RoPE settings, Qwen3, sliding windows, and the refusals naming the key. */
static void test_rope_qwen3_sliding(void **state) {
    (void)state;
    /* transformers 5: rope_parameters carries theta and type (the issue: theta was ignored) */
    st_model_config c = read_ok("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":"
                                "{\"rope_theta\":500000.0,\"rope_type\":\"default\"},\"dtype\":\"bfloat16\"}");
    assert_true(c.rope_theta == 500000.0f);
    assert_int_equal(c.rope.type, ST_ROPE_DEFAULT);
    assert_int_equal(c.rope.format, ST_ROPE_FMT_PARAMETERS);
    assert_int_equal(c.dtype_key, 1);
    c = read_ok("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_theta\":500000.0,"
                "\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
                "\"original_max_position_embeddings\":64}}");
    assert_int_equal(c.rope.type, ST_ROPE_LLAMA3);
    assert_true(c.rope.factor == 8.0 && c.rope.low_freq_factor == 1.0 && c.rope.high_freq_factor == 4.0);
    assert_int_equal(c.rope.original_max, 64);
    /* 4.x: top-level theta, rope_scaling with the old "type" key; original max defaults to max positions */
    c = read_ok("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_theta\":1e6,\"rope_scaling\":"
                "{\"type\":\"yarn\",\"factor\":4.0,\"beta_fast\":16}}");
    assert_int_equal(c.rope.type, ST_ROPE_YARN);
    assert_int_equal(c.rope.format, ST_ROPE_FMT_LEGACY);
    assert_true(c.rope_theta == 1e6f && c.rope.factor == 4.0 && c.rope.beta_fast == 16.0);
    assert_int_equal(c.rope.original_max, 256);
    c = read_ok("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"longrope\","
                "\"short_factor\":[1,1,1,1,1,1,1,1],\"long_factor\":[1,2,3,4,5,6,7,8]},"
                "\"original_max_position_embeddings\":128}");
    assert_int_equal(c.rope.type, ST_ROPE_LONGROPE);
    assert_int_equal(c.rope.n_factors, 8);
    assert_int_equal(c.rope.original_max, 128);
    assert_int_equal(c.rope.original_max_top, 1);
    assert_true(c.rope.long_factor[7] == 8.0f);
    /* refusals, each naming what is wrong */
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"su\"}}",
             "rope_type 'su' is not supported");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"linear\"}}",
             "rope_parameters needs 'factor'");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"linear\",\"factor\":2,"
             "\"low_freq_factor\":1}}", "key 'low_freq_factor' is not supported for rope_type 'linear'");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"default\"},"
             "\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":2}}", "both 'rope_parameters' and 'rope_scaling'");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"default\","
             "\"partial_rotary_factor\":0.5}}", "'partial_rotary_factor' is not supported");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"longrope\","
             "\"short_factor\":[1,1],\"long_factor\":[1,1]}}", "head_dim/2 is 8");
    read_err("{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"llama3\",\"factor\":8,"
             "\"low_freq_factor\":4,\"high_freq_factor\":1}}", "low_freq_factor < high_freq_factor");
    /* Qwen3: per-head q/k norms, head_dim defaults to 128 (Qwen3Config), attention_bias refused */
    c = read_ok("{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,"
                "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"max_position_embeddings\":256,"
                "\"vocab_size\":500,\"layer_types\":[\"full_attention\",\"full_attention\"],\"sliding_window\":null,"
                "\"use_sliding_window\":false,\"pad_token_id\":7}");
    assert_int_equal(c.qk_norm, 1);
    assert_int_equal(c.qkv_bias, 0);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.has_pad, 1);
    assert_int_equal(c.pad_id, 7);
    read_err("{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,"
             "\"num_attention_heads\":4,\"max_position_embeddings\":256,\"vocab_size\":500,\"attention_bias\":true}",
             "key 'attention_bias' = true is not supported");
    /* Qwen2 windows: only layers >= max_window_layers slide; layer_types overrides the rule */
    c = read_ok("{\"model_type\":\"qwen2\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2,"
                "\"max_position_embeddings\":256,\"vocab_size\":500,\"num_attention_heads\":4,\"num_key_value_heads\":4,"
                "\"use_sliding_window\":true,\"sliding_window\":64}");
    assert_int_equal(c.sliding_window, 0); /* max_window_layers defaults to 28 >= 2 layers */
    c = read_ok("{\"model_type\":\"qwen2\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2,"
                "\"max_position_embeddings\":256,\"vocab_size\":500,\"num_attention_heads\":4,\"num_key_value_heads\":4,"
                "\"use_sliding_window\":true,\"sliding_window\":64,\"max_window_layers\":1}");
    assert_int_equal(c.sliding_window, 64);
    assert_int_equal(c.window_first_layer, 1);
    c = read_ok("{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":3,"
                "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,\"max_position_embeddings\":256,"
                "\"vocab_size\":500,\"use_sliding_window\":true,\"sliding_window\":32,"
                "\"layer_types\":[\"full_attention\",\"sliding_attention\",\"sliding_attention\"]}");
    assert_int_equal(c.sliding_window, 32);
    assert_int_equal(c.window_first_layer, 1);
    c = read_ok(MISTRAL);
    assert_int_equal(c.window_first_layer, 0);
    read_err("{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,"
             "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,\"max_position_embeddings\":256,"
             "\"vocab_size\":500,\"use_sliding_window\":true,\"sliding_window\":32,"
             "\"layer_types\":[\"sliding_attention\",\"full_attention\"]}",
             "full_attention layer 1 after sliding_attention layer 0 is not supported");
    read_err("{\"model_type\":\"qwen2\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2,"
             "\"max_position_embeddings\":256,\"vocab_size\":500,\"num_attention_heads\":4,\"num_key_value_heads\":4,\"use_sliding_window\":true,"
             "\"sliding_window\":64,\"layer_types\":[\"full_attention\",\"chunked_attention\"]}",
             "layer_types entry 1 is not");
}

/* Writing keeps the generation of the RoPE keys and every parameter (read back equal). */
static void test_rope_roundtrip(void **state) {
    (void)state;
    const char *srcs[] = {
        "{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_theta\":500000.0,\"rope_type\":"
        "\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":64}}",
        "{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_theta\":1e6,\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0,"
        "\"beta_fast\":16,\"attention_factor\":1.25,\"truncate\":false}}",
        "{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_scaling\":{\"rope_type\":\"longrope\","
        "\"short_factor\":[1,1,1,1,1,1,1,1.5],\"long_factor\":[1,2,3,4,5,6,7,8]},\"original_max_position_embeddings\":128}",
        "{" LLAMA_BASE ",\"num_attention_heads\":4,\"rope_parameters\":{\"rope_type\":\"dynamic\",\"factor\":2.0}}",
    };
    char out[512];
    snprintf(out, sizeof out, "%s/rope_rt", st_test_dir);
    for (int i = 0; i < 4; i++) {
        st_model_config a = read_ok(srcs[i]), b;
        assert_int_equal(st_model_config_write(out, &a), 0);
        assert_int_equal(st_model_config_read(out, &b), 0);
        assert_true(a.rope_theta == b.rope_theta);
        assert_int_equal(memcmp(&a.rope, &b.rope, sizeof a.rope), 0);
    }
}

static void assert_same_config(const st_model_config *a, const st_model_config *b) {
    assert_int_equal(a->family, b->family);
    assert_string_equal(a->model_type, b->model_type);
    assert_int_equal(a->n_layer, b->n_layer);
    assert_int_equal(a->d_model, b->d_model);
    assert_int_equal(a->n_head, b->n_head);
    assert_int_equal(a->n_kv_head, b->n_kv_head);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->d_ff, b->d_ff);
    assert_int_equal(a->vocab, b->vocab);
    assert_int_equal(a->max_seq, b->max_seq);
    assert_true(a->norm_eps == b->norm_eps);
    if (a->family == ST_FAMILY_LLAMA) assert_true(a->rope_theta == b->rope_theta);
    assert_int_equal(a->tied_embeddings, b->tied_embeddings);
    assert_int_equal(a->qkv_bias, b->qkv_bias);
    assert_int_equal(a->bos_id, b->bos_id);
    assert_int_equal(a->eos_id, b->eos_id);
}

static void test_roundtrip(void **state) {
    (void)state;
    const char *configs[] = {GPT2, TINYLLAMA, QWEN2, MISTRAL};
    const char *archs[] = {"GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"};
    char out[512], p[600];
    snprintf(out, sizeof out, "%s/export/sub", st_test_dir);
    for (int i = 0; i < 4; i++) {
        st_model_config a = read_ok(configs[i]);
        a.norm_eps = 1.2345678e-6f; /* an awkward float must survive the decimal round trip */
        a.bos_id = i == 1 ? -1 : a.bos_id;
        assert_int_equal(st_model_config_write(out, &a), 0);
        st_model_config b;
        assert_int_equal(st_model_config_read(out, &b), 0);
        assert_same_config(&a, &b);
        /* the file carries the HF architecture and float32 dtype */
        snprintf(p, sizeof p, "%s/config.json", out);
        char *text;
        size_t len;
        assert_int_equal(st_read_file(p, &text, &len), 0);
        st_json *j = NULL;
        assert_int_equal(st_json_parse(text, len, &j), 0);
        free(text);
        const st_json *ar = st_json_get(j, "architectures");
        assert_non_null(ar);
        assert_string_equal(ar->items[0]->string, archs[i]);
        assert_string_equal(st_json_get_string(j, "torch_dtype", ""), i == 0 ? "float32" : "bfloat16");
        st_json_free(j);
    }
    /* invalid configs are refused before anything is written */
    st_model_config bad = read_ok(TINYLLAMA);
    bad.qkv_bias = 1;
    assert_int_equal(st_model_config_write(out, &bad), ST_ECONFIG);
    assert_non_null(strstr(st_error(), "q/k/v biases"));
    bad = read_ok(GPT2);
    bad.n_kv_head = 4;
    assert_int_equal(st_model_config_write(out, &bad), ST_ECONFIG);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpt2),         cmocka_unit_test(test_llama_family), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_errors_llama), cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_rope_qwen3_sliding), cmocka_unit_test(test_rope_roundtrip),
    };
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
