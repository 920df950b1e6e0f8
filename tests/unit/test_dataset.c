/* test_dataset.c — dataset packing (JSONL, llm.c shards), HDF5 round trip, and refusal of bad files.
 * Expected arrays are built from the test's own document lists; bad files are crafted with the
 * HDF5 API directly so the reader is checked against inputs it did not write. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "worker/dataset.h"

#include "test_tmpdir.h"

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Independent FNV-1a for the checksum check. */
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Packs `jsonl` in memory and streamed (st_dataset_pack_jsonl_file); the streamed file must load to the
 * same arrays and attributes. */
static void same_streamed(const char *jsonl, int64_t vocab, int64_t eos) {
    st_dataset mem, file;
    st_dataset_summary sum;
    assert_int_equal(st_dataset_pack_jsonl(jsonl, vocab, eos, &mem), 0);
    assert_int_equal(st_dataset_pack_jsonl_file(jsonl, st_test_path("s.h5"), vocab, eos, NULL, NULL, &sum), 0);
    assert_int_equal(st_dataset_load(st_test_path("s.h5"), &file), 0);
    assert_int_equal(file.n_tokens, mem.n_tokens);
    assert_int_equal(file.n_docs, mem.n_docs);
    assert_int_equal(file.vocab_size, mem.vocab_size);
    assert_int_equal(file.eos_id, mem.eos_id);
    assert_memory_equal(file.tokens, mem.tokens, mem.n_tokens * sizeof *mem.tokens);
    assert_memory_equal(file.loss_mask, mem.loss_mask, mem.n_tokens);
    assert_memory_equal(file.doc_offsets, mem.doc_offsets, (mem.n_docs + 1) * sizeof *mem.doc_offsets);
    assert_int_equal(sum.docs, mem.n_docs);
    assert_int_equal(sum.tokens, mem.n_tokens);
    assert_int_equal(sum.masked, st_dataset_masked_tokens(&mem));
    assert_int_equal(sum.vocab_size, mem.vocab_size);
    st_dataset_free(&mem);
    st_dataset_free(&file);
}

static void test_pack_jsonl_streamed(void **state) {
    (void)state;
    write_text(st_test_path("a.jsonl"), "{\"input_ids\": [11,12,13,14], \"labels\": [-100,-100,13,14]}\n\n  \n"
                                        "{\"input_ids\": [20, 21]}\r\n{\"labels\": [5,6,7], \"input_ids\": [5,6,7]}");
    same_streamed(st_test_path("a.jsonl"), 0, -1);
    same_streamed(st_test_path("a.jsonl"), 0, 30);
    same_streamed(st_test_path("a.jsonl"), 100, 99);
    /* past the writer's buffers: 70000 documents (> 65536 offsets) of 1..40 tokens (> 2^20 tokens) */
    FILE *f = fopen(st_test_path("big.jsonl"), "wb");
    assert_non_null(f);
    for (int d = 0; d < 70000; d++) {
        int n = 1 + (d * 7919) % 40;
        fprintf(f, "{\"input_ids\": [");
        for (int i = 0; i < n; i++) fprintf(f, "%s%d", i ? "," : "", (d + 3 * i) % 1000);
        fprintf(f, "], \"labels\": [");
        for (int i = 0; i < n; i++) fprintf(f, "%s%d", i ? "," : "", i % 3 ? (d + 3 * i) % 1000 : -100);
        fprintf(f, "]}\n");
    }
    fclose(f);
    same_streamed(st_test_path("big.jsonl"), 0, 1000);
    /* a bad line: the error names it, and neither the output nor its .partial is left */
    write_text(st_test_path("bad.jsonl"), "{\"input_ids\": [1]}\n{\"input_ids\": [1, -2]}\n");
    unlink(st_test_path("o.h5"));
    assert_true(st_dataset_pack_jsonl_file(st_test_path("bad.jsonl"), st_test_path("o.h5"), 0, -1, NULL, NULL, NULL) < 0);
    assert_non_null(strstr(st_error(), "bad.jsonl:2"));
    assert_int_equal(access(st_test_path("o.h5"), F_OK), -1);
    assert_int_equal(access(st_test_path("o.h5.partial"), F_OK), -1);
    write_text(st_test_path("empty.jsonl"), "\n \n");
    assert_true(st_dataset_pack_jsonl_file(st_test_path("empty.jsonl"), st_test_path("o.h5"), 0, -1, NULL, NULL, NULL) < 0);
    assert_non_null(strstr(st_error(), "no documents"));
    assert_int_equal(access(st_test_path("o.h5.partial"), F_OK), -1);
}

/* ---------------------------------------------------------------- JSONL */

static void test_pack_jsonl_labels_and_eos(void **state) {
    (void)state;
    /* doc0 with a masked prompt, doc1 without labels, doc2 with labels all kept. */
    const int64_t ids[3][4] = {{11, 12, 13, 14}, {20, 21, 0, 0}, {5, 6, 7, 0}};
    const int64_t labels0[4] = {-100, -100, 13, 14}, labels2[3] = {5, 6, 7};
    const int lens[3] = {4, 2, 3};
    write_text(st_test_path("a.jsonl"), "{\"input_ids\": [11,12,13,14], \"labels\": [-100,-100,13,14], \"text\": \"x\"}\n"
                               "\n   \n"
                               "{\"input_ids\": [20, 21]}\r\n"
                               "{\"labels\": [5,6,7], \"input_ids\": [5,6,7]}");
    for (int with_eos = 0; with_eos <= 1; with_eos++) {
        const int64_t eos = with_eos ? 30 : -1;
        st_dataset ds;
        assert_int_equal(st_dataset_pack_jsonl(st_test_path("a.jsonl"), 0, eos, &ds), 0);
        uint32_t want_tok[16];
        uint8_t want_mask[16];
        uint64_t want_off[4] = {0}, n = 0;
        for (int d = 0; d < 3; d++) {
            for (int i = 0; i < lens[d]; i++) {
                want_tok[n] = (uint32_t)ids[d][i];
                want_mask[n] = d == 0 ? labels0[i] != -100 : d == 2 ? labels2[i] != -100 : 1;
                n++;
            }
            if (with_eos) { want_tok[n] = 30; want_mask[n] = 1; n++; }
            want_off[d + 1] = n;
        }
        assert_int_equal(ds.n_docs, 3);
        assert_int_equal(ds.n_tokens, n);
        assert_memory_equal(ds.tokens, want_tok, n * sizeof(uint32_t));
        assert_memory_equal(ds.loss_mask, want_mask, n);
        assert_memory_equal(ds.doc_offsets, want_off, sizeof want_off);
        assert_int_equal(ds.vocab_size, with_eos ? 31 : 22); /* max id + 1 */
        assert_int_equal(ds.eos_id, eos);
        assert_int_equal(st_dataset_masked_tokens(&ds), 2);
        assert_true(ds.checksum == fnv(fnv(0xcbf29ce484222325ULL, want_tok, n * 4), want_mask, n));
        st_dataset_free(&ds);
    }
    st_dataset ds;
    assert_int_equal(st_dataset_pack_jsonl(st_test_path("a.jsonl"), 100, -1, &ds), 0);
    assert_int_equal(ds.vocab_size, 100);
    st_dataset_free(&ds);
}

static void test_pack_jsonl_errors(void **state) {
    (void)state;
    struct { const char *line2; int64_t vocab; const char *want; } cases[] = {
        {"{\"input_ids\": [1, 2.5]}", 0, "input_ids[1] is not an integer"},
        {"{\"input_ids\": [1, \"a\"]}", 0, "input_ids[1] is not an integer"},
        {"{\"input_ids\": [1, -3]}", 0, "input_ids[1] = -3 is negative"},
        {"{\"input_ids\": [1, 2], \"labels\": [1, 3]}", 0, "labels[1] = 3 differs from input_ids[1] = 2"},
        {"{\"input_ids\": [1, 2], \"labels\": [1]}", 0, "\"labels\" has 1 entries"},
        {"{\"input_ids\": [1, 50]}", 50, "input_ids[1] = 50 is not below vocab size 50"},
        {"{\"input_ids\": []}", 0, "\"input_ids\" is empty"},
        {"{\"labels\": [1]}", 0, "missing \"input_ids\""},
        {"[1, 2]", 0, "not a JSON object"},
        {"{\"input_ids\": [1, 2]", 0, "invalid JSON"},
        {"{\"input_ids\": [1, 99999999999]}", 0, "does not fit in uint32"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char text[256];
        snprintf(text, sizeof text, "{\"input_ids\": [1, 2, 3]}\n%s\n{\"input_ids\": [4]}\n", cases[c].line2);
        write_text(st_test_path("bad.jsonl"), text);
        st_dataset ds;
        int rc = st_dataset_pack_jsonl(st_test_path("bad.jsonl"), cases[c].vocab, -1, &ds);
        assert_true(rc < 0);
        assert_null(ds.tokens);
        char where[300];
        snprintf(where, sizeof where, "%s:2: ", st_test_path("bad.jsonl"));
        if (!strstr(st_error(), where) || !strstr(st_error(), cases[c].want))
            fail_msg("case %zu: message '%s' lacks '%s' or '%s'", c, st_error(), where, cases[c].want);
    }
    st_dataset ds;
    write_text(st_test_path("empty.jsonl"), "\n\n");
    assert_true(st_dataset_pack_jsonl(st_test_path("empty.jsonl"), 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "no documents"));
    assert_true(st_dataset_pack_jsonl(st_test_path("missing.jsonl"), 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "missing.jsonl"));
    write_text(st_test_path("ok.jsonl"), "{\"input_ids\": [1]}\n");
    assert_true(st_dataset_pack_jsonl(st_test_path("ok.jsonl"), 10, 10, &ds) < 0); /* eos must be below vocab */
    assert_non_null(strstr(st_error(), "--eos 10"));
}

/* ---------------------------------------------------------------- HDF5 */

static void test_roundtrip(void **state) {
    (void)state;
    enum { N = 70000 }; /* more than one chunk */
    st_dataset ds = {0};
    ds.tokens = malloc(N * sizeof(uint32_t));
    ds.loss_mask = malloc(N);
    ds.doc_offsets = malloc(4 * sizeof(uint64_t));
    for (uint32_t i = 0; i < N; i++) {
        ds.tokens[i] = (i * 2654435761u) % 50257u;
        ds.loss_mask[i] = (i % 7) != 0;
    }
    uint64_t off[4] = {0, 10, 10, N}; /* an empty document is allowed */
    memcpy(ds.doc_offsets, off, sizeof off);
    ds.n_tokens = N;
    ds.n_docs = 3;
    ds.vocab_size = 50257;
    ds.eos_id = 50256;
    assert_int_equal(st_dataset_write(st_test_path("rt.h5"), &ds), 0);
    struct stat st;
    assert_int_not_equal(stat(st_test_path("rt.h5.partial"), &st), 0);
    st_dataset back;
    assert_int_equal(st_dataset_load(st_test_path("rt.h5"), &back), 0);
    assert_int_equal(back.n_tokens, N);
    assert_int_equal(back.n_docs, 3);
    assert_memory_equal(back.tokens, ds.tokens, N * sizeof(uint32_t));
    assert_memory_equal(back.loss_mask, ds.loss_mask, N);
    assert_memory_equal(back.doc_offsets, off, sizeof off);
    assert_int_equal(back.vocab_size, 50257);
    assert_int_equal(back.eos_id, 50256);
    assert_true(back.checksum == fnv(fnv(0xcbf29ce484222325ULL, ds.tokens, N * 4), ds.loss_mask, N));
    assert_string_equal(back.path, st_test_path("rt.h5"));
    st_dataset_free(&back);

    /* Truncated: everything after the middle of the file is gone. */
    assert_int_equal(stat(st_test_path("rt.h5"), &st), 0);
    assert_int_equal(truncate(st_test_path("rt.h5"), st.st_size / 2), 0);
    assert_true(st_dataset_load(st_test_path("rt.h5"), &back) < 0);
    assert_non_null(strstr(st_error(), st_test_path("rt.h5")));
    assert_null(back.tokens);
    st_dataset_free(&ds);
}

/* Writes a hand-made file: each array is optional (NULL), with explicit file types. */
typedef struct {
    hid_t tok_type; const void *tok; hsize_t n_tok;
    hid_t mask_type; const void *mask; hsize_t n_mask;
    hid_t off_type; const void *off; hsize_t n_off;
    int64_t vocab; int with_vocab;
} raw_file;

static void put(hid_t f, const char *name, hid_t type, const void *data, hsize_t n) {
    if (!data) return;
    hid_t sp = H5Screate_simple(1, &n, NULL);
    hid_t d = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(d >= 0);
    assert_true(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    H5Dclose(d);
    H5Sclose(sp);
}

static void write_raw(const char *path, const raw_file *r) {
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    put(f, "tokens", r->tok_type, r->tok, r->n_tok);
    put(f, "loss_mask", r->mask_type, r->mask, r->n_mask);
    put(f, "doc_offsets", r->off_type, r->off, r->n_off);
    if (r->with_vocab) {
        hid_t sp = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(f, "vocab_size", H5T_NATIVE_INT64, sp, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT64, &r->vocab);
        H5Aclose(a);
        H5Sclose(sp);
    }
    H5Fclose(f);
}

static void expect_load_error(const raw_file *r, const char *want) {
    write_raw(st_test_path("raw.h5"), r);
    st_dataset ds;
    int rc = st_dataset_load(st_test_path("raw.h5"), &ds);
    if (rc == 0) fail_msg("load accepted a bad file (expected '%s')", want);
    if (!strstr(st_error(), want) || !strstr(st_error(), st_test_path("raw.h5")))
        fail_msg("message '%s' lacks '%s' or the path", st_error(), want);
    assert_null(ds.tokens);
}

static void test_load_errors(void **state) {
    (void)state;
    uint32_t tok[6] = {1, 2, 3, 4, 5, 6};
    int64_t tok64[6] = {1, 2, 3, 4, 5, 6};
    uint8_t mask[6] = {1, 0, 1, 1, 1, 1};
    uint64_t off[3] = {0, 2, 6}, off_bad[3] = {0, 4, 2}, off_short[3] = {0, 2, 5};
    const raw_file good = {H5T_NATIVE_UINT32, tok, 6, H5T_NATIVE_UINT8, mask, 6, H5T_NATIVE_UINT64, off, 3, 10, 1};

    /* The good file loads, and without /loss_mask every token is a target. */
    write_raw(st_test_path("raw.h5"), &good);
    st_dataset ds;
    assert_int_equal(st_dataset_load(st_test_path("raw.h5"), &ds), 0);
    assert_int_equal(ds.eos_id, -1);
    assert_int_equal(ds.loss_mask[1], 0);
    st_dataset_free(&ds);
    raw_file r = good;
    r.mask = NULL;
    write_raw(st_test_path("raw.h5"), &r);
    assert_int_equal(st_dataset_load(st_test_path("raw.h5"), &ds), 0);
    for (int i = 0; i < 6; i++) assert_int_equal(ds.loss_mask[i], 1);
    st_dataset_free(&ds);

    r = good; r.tok = NULL;
    expect_load_error(&r, "missing /tokens");
    r = good; r.tok_type = H5T_NATIVE_INT64; r.tok = tok64;
    expect_load_error(&r, "/tokens has the wrong type (expected uint32)");
    r = good; r.tok_type = H5T_NATIVE_FLOAT; r.tok = tok; /* same bytes, float type */
    expect_load_error(&r, "/tokens has the wrong type");
    r = good; r.off = off_bad;
    expect_load_error(&r, "/doc_offsets is not monotone at index 2");
    r = good; r.off = off_short;
    expect_load_error(&r, "last /doc_offsets entry is 5 but /tokens has 6");
    r = good; r.off = NULL;
    expect_load_error(&r, "missing /doc_offsets");
    r = good; r.n_mask = 5;
    expect_load_error(&r, "/loss_mask has 5 entries but /tokens has 6");
    r = good; r.vocab = 5;
    expect_load_error(&r, "/tokens[4] = 5 is not below vocab_size 5");
    r = good; r.with_vocab = 0;
    expect_load_error(&r, "missing root attribute vocab_size");

    write_text(st_test_path("text.h5"), "this is not HDF5\n");
    assert_true(st_dataset_load(st_test_path("text.h5"), &ds) < 0);
    assert_non_null(strstr(st_error(), "is not an HDF5 file"));
    assert_true(st_dataset_load(st_test_path("nope.h5"), &ds) < 0);
    assert_non_null(strstr(st_error(), "nope.h5"));
    assert_non_null(strstr(st_error(), "No such file"));
}

/* ---------------------------------------------------------------- llm.c */

static void write_shard(const char *path, const uint16_t *tok, int n, int header_count, int magic) {
    int32_t h[256] = {0};
    h[0] = magic;
    h[1] = 1;
    h[2] = header_count;
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(h, sizeof h, 1, f);
    fwrite(tok, 2, (size_t)n, f);
    fclose(f);
}

static void test_pack_llmc(void **state) {
    (void)state;
    const uint16_t E = 50256;
    const uint16_t s0[] = {E, 1, 2, 3, E, 4, 5}, s1[] = {6, E, 7};
    mkdir(st_test_path("llmc"), 0755);
    /* Created in reverse order: packing must follow the sorted names, not creation order. */
    write_shard(st_test_path("llmc/shard_001.bin"), s1, 3, 3, 20240520);
    write_shard(st_test_path("llmc/shard_000.bin"), s0, 7, 7, 20240520);
    char pattern[512];
    snprintf(pattern, sizeof pattern, "%s", st_test_path("llmc/shard_*.bin"));
    st_dataset ds;
    assert_int_equal(st_dataset_pack_llmc(pattern, 0, -1, &ds), 0);
    const uint32_t want_tok[] = {E, 1, 2, 3, E, 4, 5, 6, E, 7};
    const uint64_t want_off[] = {0, 4, 8, 10}; /* the second document continues into shard 1 */
    assert_int_equal(ds.n_tokens, 10);
    assert_int_equal(ds.n_docs, 3);
    assert_memory_equal(ds.tokens, want_tok, sizeof want_tok);
    assert_memory_equal(ds.doc_offsets, want_off, sizeof want_off);
    assert_int_equal(ds.eos_id, E);
    assert_int_equal(ds.vocab_size, E + 1);
    assert_int_equal(st_dataset_masked_tokens(&ds), 0);
    st_dataset_free(&ds);

    /* A custom EOS splits elsewhere; a vocab below the ids is refused. */
    assert_int_equal(st_dataset_pack_llmc(pattern, 60000, 4, &ds), 0);
    assert_int_equal(ds.n_docs, 2); /* [E,1,2,3,E] [4,...] */
    assert_int_equal(ds.doc_offsets[1], 5);
    st_dataset_free(&ds);
    assert_true(st_dataset_pack_llmc(pattern, 100, 4, &ds) < 0);
    assert_non_null(strstr(st_error(), "not below --vocab 100"));

    /* Truncated shard: the header promises more tokens than the file holds. */
    write_shard(st_test_path("llmc/shard_002.bin"), s1, 3, 5, 20240520);
    assert_true(st_dataset_pack_llmc(pattern, 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "shard_002.bin: truncated"));
    write_shard(st_test_path("llmc/shard_002.bin"), s1, 3, 3, 1234);
    assert_true(st_dataset_pack_llmc(pattern, 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "shard_002.bin: bad magic 1234"));
    write_text(st_test_path("llmc/shard_002.bin"), "short");
    assert_true(st_dataset_pack_llmc(pattern, 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "shard_002.bin: truncated header"));
    assert_true(st_dataset_pack_llmc(st_test_path("llmc/none_*.bin"), 0, -1, &ds) < 0);
    assert_non_null(strstr(st_error(), "no files match"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_jsonl_labels_and_eos),
        cmocka_unit_test(test_pack_jsonl_errors),
        cmocka_unit_test(test_pack_jsonl_streamed),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_pack_llmc),
    };
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
