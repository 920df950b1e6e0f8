/* test_safetensors.c — safetensors round trips (single and sharded, bit-exact), fp16/bf16 upcast against
 * an independent ldexp-based reference, and every header validation error naming file and tensor.
 * Hand-made files are assembled byte by byte here, independently of the writer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"

#include "test_tmpdir.h"

static void write_raw(const char *path, uint64_t hlen, const char *header, const void *data, size_t data_len) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    unsigned char lb[8];
    for (int i = 0; i < 8; i++) lb[i] = (unsigned char)(hlen >> (8 * i));
    assert_int_equal(fwrite(lb, 1, 8, f), 8);
    size_t n = strlen(header);
    if (n) assert_int_equal(fwrite(header, 1, n, f), n);
    if (data_len) assert_int_equal(fwrite(data, 1, data_len, f), data_len);
    fclose(f);
}

static void write_hdr(const char *path, const char *header, size_t data_len) {
    static unsigned char zeros[4096];
    assert_true(data_len <= sizeof zeros);
    write_raw(path, strlen(header), header, zeros, data_len);
}

/* Opening must fail with `code` and a message containing each of the given fragments. */
static void expect_open_error(const char *path, int code, const char *frag1, const char *frag2) {
    st_safetensors *s = (st_safetensors *)0x1;
    int rc = st_safetensors_open(path, &s);
    if (rc != code) fprintf(stderr, "rc=%d msg=%s\n", rc, st_error());
    assert_int_equal(rc, code);
    assert_null(s);
    const char *msg = st_error();
    if ((frag1 && !strstr(msg, frag1)) || (frag2 && !strstr(msg, frag2)))
        fail_msg("message '%s' lacks '%s' / '%s'", msg, frag1, frag2 ? frag2 : "");
    assert_null(strchr(msg, '\n'));
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------- round trips */

static void check_same(st_safetensors *s, const st_st_write_item *it) {
    const st_st_tensor *t = st_safetensors_find(s, it->name);
    assert_non_null(t);
    assert_string_equal(t->name, it->name);
    assert_int_equal(t->dtype, ST_DTYPE_F32);
    assert_int_equal(t->ndim, it->ndim);
    size_t n = 1;
    for (int d = 0; d < it->ndim; d++) {
        assert_int_equal(t->shape[d], it->shape[d]);
        n *= (size_t)it->shape[d];
    }
    float *got = malloc(n * sizeof(float) + 4);
    assert_non_null(got);
    assert_int_equal(st_safetensors_read_f32(s, t, got, n), 0);
    if (n) assert_memory_equal(got, it->data, n * sizeof(float));
    free(got);
}

static void test_roundtrip(void **state) {
    (void)state;
    float a[24], b[5], c = 3.5f, z = 0;
    for (int i = 0; i < 24; i++) a[i] = (float)i * 0.37f - 4.0f;
    b[0] = -0.0f;
    b[1] = from_bits(0x7FC01234u); /* nan with payload */
    b[2] = INFINITY;
    b[3] = from_bits(0x00000001u); /* smallest subnormal */
    b[4] = -FLT_MAX;
    st_st_write_item items[] = {
        {"h.0.attn.c_attn.weight", a, 3, {2, 3, 4}},
        {"special \"quoted\" name", b, 1, {5}},
        {"scalar", &c, 0, {0}},
        {"empty", &z, 2, {0, 7}},
    };
    const char *path = st_test_path("rt.safetensors");
    assert_int_equal(st_safetensors_write(path, 4, items, "{\"format\":\"pt\",\"step\":\"12\"}"), 0);
    struct stat stt;
    assert_int_equal(stat(st_test_path("rt.safetensors.partial"), &stt), -1); /* temp file renamed away */

    /* the data buffer starts 8-byte aligned: check the header length field directly */
    FILE *f = fopen(path, "rb");
    unsigned char lb[8];
    assert_int_equal(fread(lb, 1, 8, f), 8);
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | lb[i];
    assert_int_equal(hlen % 8, 0);
    assert_int_equal(stat(path, &stt), 0);
    assert_int_equal((uint64_t)stt.st_size, 8 + hlen + (24 + 5 + 1) * 4);

    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(path, &s), 0);
    assert_int_equal(st_safetensors_count(s), 4);
    assert_string_equal(st_safetensors_tensor(s, 0)->name, "h.0.attn.c_attn.weight"); /* file order */
    assert_null(st_safetensors_tensor(s, 4));
    assert_null(st_safetensors_find(s, "nope"));
    assert_string_equal(st_safetensors_metadata(s, "step"), "12");
    for (int i = 0; i < 4; i++) check_same(s, &items[i]);
    assert_int_equal(st_safetensors_find(s, "scalar")->ndim, 0);

    /* wrong element count names the tensor and its shape */
    float tmp[30];
    const st_st_tensor *t = st_safetensors_find(s, "h.0.attn.c_attn.weight");
    assert_int_equal(st_safetensors_read_f32(s, t, tmp, 23), ST_ESHAPE);
    assert_non_null(strstr(st_error(), "'h.0.attn.c_attn.weight'"));
    assert_non_null(strstr(st_error(), "[2,3,4]"));
    assert_non_null(strstr(st_error(), "23"));
    st_safetensors_close(s);

    /* default metadata is {"format":"pt"} (transformers checks it) */
    assert_int_equal(st_safetensors_write(path, 1, items, NULL), 0);
    assert_int_equal(st_safetensors_open(path, &s), 0);
    assert_string_equal(st_safetensors_metadata(s, "format"), "pt");
    st_safetensors_close(s);
}

static void test_sharded(void **state) {
    (void)state;
    /* 40, 40, 40, 100, 8 bytes with a 96-byte limit: {a,b} {c} {d} {e} (d alone: bigger than the limit) */
    float a[10], b[10], c[10], d[25], e[2];
    for (int i = 0; i < 10; i++) a[i] = (float)i, b[i] = (float)-i, c[i] = 1.0f / (float)(i + 1);
    for (int i = 0; i < 25; i++) d[i] = (float)i * 1e-3f;
    e[0] = 7, e[1] = 8;
    st_st_write_item items[] = {
        {"a", a, 1, {10}}, {"b", b, 2, {2, 5}}, {"c", c, 1, {10}}, {"d", d, 2, {5, 5}}, {"e", e, 1, {2}},
    };
    const char *dir = st_test_path("sharded");
    assert_int_equal(st_safetensors_write_sharded(dir, 5, items, 96), 0);
    const char *expect_files[4] = {"model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                                   "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"};
    const char *expect_shard[5] = {expect_files[0], expect_files[0], expect_files[1], expect_files[2], expect_files[3]};
    char p[512];
    struct stat stt;
    for (int k = 0; k < 4; k++) {
        snprintf(p, sizeof p, "%s/%s", dir, expect_files[k]);
        assert_int_equal(stat(p, &stt), 0);
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    assert_int_equal(stat(p, &stt), -1);

    /* the index, read with the JSON module */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    char *text;
    size_t len;
    assert_int_equal(st_read_file(p, &text, &len), 0);
    st_json *idx = NULL;
    assert_int_equal(st_json_parse(text, len, &idx), 0);
    free(text);
    assert_int_equal(st_json_get_int(st_json_get(idx, "metadata"), "total_size", 0, NULL), 228);
    const st_json *wm = st_json_get(idx, "weight_map");
    assert_int_equal(wm->count, 5);
    for (int i = 0; i < 5; i++) assert_string_equal(st_json_get_string(wm, items[i].name, ""), expect_shard[i]);
    st_json_free(idx);

    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(dir, &s), 0);
    assert_int_equal(st_safetensors_count(s), 5);
    for (int i = 0; i < 5; i++) check_same(s, &items[i]);
    assert_int_equal(st_safetensors_find(s, "a")->file, st_safetensors_find(s, "b")->file);
    assert_true(st_safetensors_find(s, "c")->file != st_safetensors_find(s, "d")->file);
    st_safetensors_close(s);
    /* the index file itself can be opened too */
    assert_int_equal(st_safetensors_open(p, &s), 0);
    assert_int_equal(st_safetensors_count(s), 5);
    st_safetensors_close(s);

    /* re-export unsharded into the same directory: single file, stale index gone */
    assert_int_equal(st_safetensors_write_sharded(dir, 5, items, 1 << 20), 0);
    assert_int_equal(stat(p, &stt), -1);
    assert_int_equal(st_safetensors_open(dir, &s), 0);
    assert_int_equal(st_safetensors_count(s), 5);
    for (int i = 0; i < 5; i++) check_same(s, &items[i]);
    st_safetensors_close(s);
}

/* ---------------------------------------------------------------- upcasts */

/* Independent fp16 reference: the IEEE binary16 definition evaluated in double. */
static double f16_reference(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
    double v;
    if (exp == 31) v = man ? NAN : INFINITY;
    else if (exp == 0) v = ldexp((double)man, -24);
    else v = ldexp((double)(1024 + man), exp - 25);
    return sign ? -v : v;
}

static void test_f16_exhaustive(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float got = st_f16_to_f32((uint16_t)h);
        double want = f16_reference((uint16_t)h);
        if (isnan(want)) {
            assert_true(isnan(got));
            assert_int_equal(bits(got) >> 31, h >> 15);
        } else {
            if ((double)got != want || !!signbit(got) != !!signbit(want)) fail_msg("f16 0x%04x: got %a want %a", h, got, want);
        }
    }
}

static void test_upcast_file(void **state) {
    (void)state;
    /* hand-encoded fp16 and bf16 tensors plus an F64 one, in one hand-built file */
    const uint16_t h16[8] = {0x3C00, 0xC000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7BFF, 0x8000};
    const double h16_want[8] = {1.0, -2.0, ldexp(1, -24), -ldexp(1023, -24), INFINITY, -INFINITY, 65504.0, -0.0};
    const uint16_t b16[6] = {0x3F80, 0xC0A0, 0x0001, 0xFF80, 0x4049, 0x7FC0};
    const double b16_want[6] = {1.0, -5.0, ldexp(1, -133), -INFINITY, 3.140625, NAN};
    const double f64[3] = {0.1, -1e300, 2.5};
    unsigned char data[16 + 12 + 24 + 4];
    memcpy(data, h16, 16);
    memcpy(data + 16, b16, 12);
    memcpy(data + 28, f64, 24);
    memset(data + 52, 0, 4);
    const char *hdr = "{\"half\":{\"dtype\":\"F16\",\"shape\":[2,4],\"data_offsets\":[0,16]},"
                      "\"brain\":{\"dtype\":\"BF16\",\"shape\":[6],\"data_offsets\":[16,28]},"
                      "\"dbl\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[28,52]},"
                      "\"ints\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[52,56]}}";
    const char *path = st_test_path("upcast.safetensors");
    write_raw(path, strlen(hdr), hdr, data, sizeof data);
    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(path, &s), 0);
    float out[8];
    assert_int_equal(st_safetensors_read_f32(s, st_safetensors_find(s, "half"), out, 8), 0);
    for (int i = 0; i < 8; i++) {
        assert_true((double)out[i] == h16_want[i]);
        assert_int_equal(!!signbit(out[i]), !!signbit(h16_want[i]));
    }
    assert_int_equal(st_safetensors_read_f32(s, st_safetensors_find(s, "brain"), out, 6), 0);
    for (int i = 0; i < 5; i++) assert_true((double)out[i] == b16_want[i]);
    assert_true(isnan(out[5]));
    assert_int_equal(st_safetensors_read_f32(s, st_safetensors_find(s, "dbl"), out, 3), 0);
    assert_true(out[0] == 0.1f && isinf(out[1]) && out[1] < 0 && out[2] == 2.5f);
    /* integer tensors are not silently converted */
    const st_st_tensor *it = st_safetensors_find(s, "ints");
    assert_int_equal(st_safetensors_read_f32(s, it, out, 1), ST_EINVAL);
    assert_non_null(strstr(st_error(), "'ints'"));
    int32_t raw = -1;
    assert_int_equal(st_safetensors_read_raw(s, it, &raw, 4), 0);
    assert_int_equal(raw, 0);
    st_safetensors_close(s);
}

/* ---------------------------------------------------------------- validation */

static void test_truncated(void **state) {
    (void)state;
    float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8};
    st_st_write_item items[] = {{"h.0.attn.c_attn.weight", a, 1, {4}}, {"h.0.attn.c_proj.weight", b, 1, {4}}};
    const char *path = st_test_path("trunc.safetensors");
    assert_int_equal(st_safetensors_write(path, 2, items, NULL), 0);
    struct stat stt;
    assert_int_equal(stat(path, &stt), 0);
    assert_int_equal(truncate(path, stt.st_size - 3), 0);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'h.0.attn.c_proj.weight' data_offsets [16,32] beyond end of file (truncated?)");
    /* truncated inside the header */
    assert_int_equal(truncate(path, 20), 0);
    expect_open_error(path, ST_EFORMAT, path, "larger than the file");
    assert_int_equal(truncate(path, 5), 0);
    expect_open_error(path, ST_EFORMAT, path, "too short");
}

static void test_header_length(void **state) {
    (void)state;
    const char *path = st_test_path("hlen.safetensors");
    write_raw(path, 1000, "{}", NULL, 0);
    expect_open_error(path, ST_EFORMAT, path, "header length 1000 is larger than the file");
    write_raw(path, (uint64_t)200 << 20, "{}", NULL, 0);
    expect_open_error(path, ST_EFORMAT, path, "exceeds");
    write_raw(path, UINT64_MAX, "{}", NULL, 0);
    expect_open_error(path, ST_EFORMAT, path, "exceeds");
}

static void test_bad_entries(void **state) {
    (void)state;
    const char *path = st_test_path("bad.safetensors");
    write_hdr(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                    "\"x.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]}}", 24);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'x.weight' data_offsets [8,24] overlap tensor 'w' [0,16]");

    write_hdr(path, "{\"q.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24);
    expect_open_error(path, ST_EFORMAT, "tensor 'q.weight' shape [2,3] of F32 needs 24 bytes but data_offsets [0,20] span 20", path);

    write_hdr(path, "{\"q.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]", 24);
    expect_open_error(path, ST_EFORMAT, path, "invalid JSON");

    write_hdr(path, "[1,2]", 0);
    expect_open_error(path, ST_EFORMAT, path, "not a JSON object");

    write_hdr(path, "{\"q.weight\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'q.weight' has unknown dtype 'Q4'");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' shape[0]");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' needs \"data_offsets\"");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' has 9 dimensions");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' shape [4294967296,4294967296] is too large");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"k\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' appears twice");

    write_hdr(path, "{\"__metadata__\":[1],\"k\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    expect_open_error(path, ST_EFORMAT, path, "__metadata__");

    write_hdr(path, "{\"k\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4);
    expect_open_error(path, ST_EFORMAT, path, "tensor 'k' needs \"data_offsets\"");

    /* zero-size tensors may share an offset with others; a well-formed hand-built file opens */
    write_hdr(path, "{\"__metadata__\":{\"format\":\"pt\"},\"e\":{\"dtype\":\"BF16\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                    "\"k\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4);
    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(path, &s), 0);
    assert_int_equal(st_safetensors_count(s), 2);
    st_safetensors_close(s);

    expect_open_error(st_test_path("does-not-exist.safetensors"), ST_EIO, "does-not-exist.safetensors", NULL);
    expect_open_error(st_test_dir, ST_EIO, st_test_dir, "no model.safetensors");
}

static void test_bad_index(void **state) {
    (void)state;
    const char *dir = st_test_path("badidx");
    assert_int_equal(st_mkdirs(dir), 0);
    char p[512], shard[512];
    snprintf(shard, sizeof shard, "%s/model-00001-of-00001.safetensors", dir);
    write_hdr(shard, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);

    const char *ok = "{\"metadata\":{\"total_size\":8},\"weight_map\":{\"w\":\"model-00001-of-00001.safetensors\"}}";
    assert_int_equal(st_write_file_atomic(p, ok, strlen(ok)), 0);
    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(dir, &s), 0);
    assert_int_equal(st_safetensors_count(s), 1);
    st_safetensors_close(s);

    const char *missing = "{\"weight_map\":{\"w\":\"model-00001-of-00001.safetensors\",\"v\":\"model-00002-of-00002.safetensors\"}}";
    assert_int_equal(st_write_file_atomic(p, missing, strlen(missing)), 0);
    expect_open_error(dir, ST_EIO, "model-00002-of-00002.safetensors", "cannot open");

    const char *wrong = "{\"weight_map\":{\"w\":\"model-00001-of-00001.safetensors\",\"v\":\"model-00001-of-00001.safetensors\"}}";
    assert_int_equal(st_write_file_atomic(p, wrong, strlen(wrong)), 0);
    expect_open_error(dir, ST_EFORMAT, "model.safetensors.index.json: tensor 'v' is mapped to model-00001-of-00001.safetensors but not found there", NULL);

    const char *escape = "{\"weight_map\":{\"w\":\"../../etc/passwd\"}}";
    assert_int_equal(st_write_file_atomic(p, escape, strlen(escape)), 0);
    expect_open_error(dir, ST_EFORMAT, "tensor 'w' maps to an invalid shard file name", p);

    const char *nomap = "{\"metadata\":{}}";
    assert_int_equal(st_write_file_atomic(p, nomap, strlen(nomap)), 0);
    expect_open_error(dir, ST_EFORMAT, p, "weight_map");

    assert_int_equal(st_write_file_atomic(p, "{", 1), 0);
    expect_open_error(dir, ST_EFORMAT, p, "invalid JSON");
}

static void test_writer_errors(void **state) {
    (void)state;
    float a[2] = {1, 2};
    const char *path = st_test_path("werr.safetensors");
    st_st_write_item dup[] = {{"x", a, 1, {2}}, {"x", a, 1, {2}}};
    assert_int_equal(st_safetensors_write(path, 2, dup, NULL), ST_EINVAL);
    assert_non_null(strstr(st_error(), "'x' given twice"));
    st_st_write_item neg[] = {{"y", a, 1, {-2}}};
    assert_int_equal(st_safetensors_write(path, 1, neg, NULL), ST_EINVAL);
    assert_non_null(strstr(st_error(), "'y'"));
    st_st_write_item one[] = {{"z", a, 1, {2}}};
    assert_int_equal(st_safetensors_write(path, 1, one, "{\"n\": 3}"), ST_EINVAL);
    assert_int_equal(st_safetensors_write(path, 1, one, "not json"), ST_EINVAL);
    struct stat stt;
    assert_int_equal(stat(path, &stt), -1); /* nothing left behind */
    assert_int_equal(stat(st_test_path("werr.safetensors.partial"), &stt), -1);
}

static int same_file(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int same = st_read_file(a, &x, &nx) == 0 && st_read_file(b, &y, &ny) == 0 && nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return same;
}

/* The streaming writer (layout from the shapes, tensors put one at a time) against the one-call writers:
 * the same bytes, sharded and single, F32 and BF16; its misuse fails by name and leaves no .partial. */
static void test_stream_writer(void **state) {
    (void)state;
    float a[10], b[10], c[10], d[25], e[2];
    for (int i = 0; i < 10; i++) a[i] = (float)i * 0.3f, b[i] = (float)-i, c[i] = 1.0f / (float)(i + 1);
    for (int i = 0; i < 25; i++) d[i] = (float)i * 1e-3f;
    e[0] = 7, e[1] = 8;
    st_st_write_item items[] = {
        {"a", a, 1, {10}}, {"b", b, 2, {2, 5}}, {"c", c, 1, {10}}, {"d", d, 2, {5, 5}}, {"e", e, 1, {2}},
    };
    st_st_write_item shapes[5];
    memcpy(shapes, items, sizeof shapes);
    for (int i = 0; i < 5; i++) shapes[i].data = NULL; /* the stream needs no data up front */
    const int dtypes[2] = {ST_DTYPE_F32, ST_DTYPE_BF16};
    const uint64_t limits[2] = {96, 0};
    for (int k = 0; k < 4; k++) {
        int dt = dtypes[k % 2];
        uint64_t lim = limits[k / 2];
        char one[256], two[300], p[600], q[600];
        snprintf(one, sizeof one, "%s", st_test_path(k == 0 ? "sw0" : k == 1 ? "sw1" : k == 2 ? "sw2" : "sw3"));
        snprintf(two, sizeof two, "%s_s", one);
        assert_int_equal(st_safetensors_write_sharded_as(one, 5, items, lim, dt), 0);
        st_st_stream *w = NULL;
        assert_int_equal(st_safetensors_stream_open(two, 5, shapes, lim, dt, &w), 0);
        for (int i = 0; i < 5; i++) assert_int_equal(st_safetensors_stream_put(w, items[i].data), 0);
        assert_int_equal(st_safetensors_stream_finish(w), 0);
        /* every file of the one-call writer's directory, byte for byte, and no more files */
        DIR *dd = opendir(one);
        assert_non_null(dd);
        int files = 0;
        for (struct dirent *de; (de = readdir(dd));) {
            if (de->d_name[0] == '.') continue;
            snprintf(p, sizeof p, "%s/%s", one, de->d_name);
            snprintf(q, sizeof q, "%s/%s", two, de->d_name);
            if (!same_file(p, q)) fail_msg("%s differs from %s", q, p);
            files++;
        }
        closedir(dd);
        assert_int_equal(files, lim ? (dt == ST_DTYPE_F32 ? 5 : 3) : 1); /* shards (+ index) or one file */
        dd = opendir(two);
        for (struct dirent *de; (de = readdir(dd));) files -= de->d_name[0] != '.';
        closedir(dd);
        assert_int_equal(files, 0);
    }
    /* a single file written through the stream = st_safetensors_write_as with the default metadata */
    assert_int_equal(st_safetensors_write_as(st_test_path("sw_single.safetensors"), 5, items, NULL, ST_DTYPE_BF16), 0);
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", st_test_path("sw3_s"));
    assert_true(same_file(p, st_test_path("sw_single.safetensors")));

    /* misuse: one put too many, a finish short of tensors, an abort midway: no .partial stays */
    st_st_stream *w = NULL;
    assert_int_equal(st_safetensors_stream_open(st_test_path("sw_bad"), 2, shapes, 0, ST_DTYPE_F32, &w), 0);
    assert_int_equal(st_safetensors_stream_put(w, a), 0);
    assert_int_equal(st_safetensors_stream_put(w, b), 0);
    assert_int_equal(st_safetensors_stream_put(w, c), ST_EINVAL);
    assert_non_null(strstr(st_error(), "more tensors put than announced"));
    assert_int_equal(st_safetensors_stream_finish(w), 0);
    assert_int_equal(st_safetensors_stream_open(st_test_path("sw_short"), 3, shapes, 0, ST_DTYPE_F32, &w), 0);
    assert_int_equal(st_safetensors_stream_put(w, a), 0);
    assert_int_equal(st_safetensors_stream_finish(w), ST_EINVAL);
    assert_non_null(strstr(st_error(), "1 of 3 tensors were put"));
    struct stat stt;
    snprintf(p, sizeof p, "%s/model.safetensors.partial", st_test_path("sw_short"));
    assert_int_equal(stat(p, &stt), -1);
    snprintf(p, sizeof p, "%s/model.safetensors", st_test_path("sw_short"));
    assert_int_equal(stat(p, &stt), -1);
    assert_int_equal(st_safetensors_stream_open(st_test_path("sw_abort"), 3, shapes, 0, ST_DTYPE_F32, &w), 0);
    assert_int_equal(st_safetensors_stream_put(w, a), 0);
    st_safetensors_stream_abort(w);
    snprintf(p, sizeof p, "%s/model.safetensors.partial", st_test_path("sw_abort"));
    assert_int_equal(stat(p, &stt), -1);

    /* ranged reads of a BF16 file: any [first, first + n) equals that slice of the whole read */
    st_safetensors *s = NULL;
    assert_int_equal(st_safetensors_open(st_test_path("sw_single.safetensors"), &s), 0);
    const st_st_tensor *t = st_safetensors_find(s, "d");
    float whole[25], part[25];
    assert_int_equal(st_safetensors_read_f32(s, t, whole, 25), 0);
    for (int first = 0; first < 25; first += 3)
        for (int n = 0; first + n <= 25; n += 4) {
            assert_int_equal(st_safetensors_read_f32_range(s, t, (uint64_t)first, (size_t)n, part), 0);
            assert_memory_equal(part, whole + first, (size_t)n * sizeof(float));
        }
    assert_int_equal(st_safetensors_read_f32_range(s, t, 20, 6, part), ST_ESHAPE);
    assert_non_null(strstr(st_error(), "'d'"));
    st_safetensors_close(s);
}

/* Writing as BF16 / F16: each stored value is the nearest representable one (ties to even), across
 * normals, subnormals, zeros, infinities and overflow; the header names the dtype. */
static void test_write_half(void **state) {
    (void)state;
    enum { N = 4096 };
    static float x[N];
    uint64_t r = 12345;
    for (int i = 0; i < N; i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        uint32_t u = (uint32_t)(r >> 32);
        float f;
        memcpy(&f, &u, sizeof f);
        if (!(f == f)) f = 1.0f; /* NaN payloads are not compared */
        x[i] = i % 4 == 0 ? f : ldexpf((float)((int)(u % 20001) - 10000) / 7.0f, (int)(u % 48) - 30);
    }
    x[0] = 0.0f; x[1] = -0.0f; x[2] = 65504.0f; x[3] = 65520.0f; x[4] = 1e-8f; x[5] = 2.9802322e-08f;
    x[6] = 1.0f + 1.0f / 2048.0f; /* a tie: rounds to even (1.0) */
    const int dtypes[2] = {ST_DTYPE_BF16, ST_DTYPE_F16};
    for (int k = 0; k < 2; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/half%d.safetensors", st_test_dir, k);
        st_st_write_item it = {"x", x, 1, {N}};
        assert_int_equal(st_safetensors_write_as(path, 1, &it, NULL, dtypes[k]), 0);
        st_safetensors *s = NULL;
        assert_int_equal(st_safetensors_open(path, &s), 0);
        const st_st_tensor *t = st_safetensors_find(s, "x");
        assert_non_null(t);
        assert_int_equal(t->dtype, dtypes[k]);
        static uint16_t h[N];
        assert_int_equal(st_safetensors_read_raw(s, t, h, sizeof h), 0);
        for (int i = 0; i < N; i++) {
            float (*wide)(uint16_t) = k ? st_f16_to_f32 : st_bf16_to_f32;
            double got = wide(h[i]), want = x[i];
            /* neighbours toward +/- (same sign magnitude steps) are not closer */
            uint16_t mag = h[i] & 0x7fff, sign = h[i] & 0x8000;
            uint16_t inf = k ? 0x7c00 : 0x7f80;
            if (mag == inf) { /* overflow: past the largest finite value by at least half an ulp */
                assert_true(fabs(want) >= fabs((double)wide((uint16_t)(inf - 1))));
                continue;
            }
            double e = fabs(got - want);
            if (mag > 0) assert_true(e <= fabs((double)wide((uint16_t)(sign | (mag - 1))) - want));
            assert_true(e <= fabs((double)wide((uint16_t)(sign | (mag + 1))) - want));
            if (e == fabs((double)wide((uint16_t)(sign | (mag + 1))) - want) && e > 0) assert_int_equal(mag & 1, 0);
        }
        assert_true(st_f16_to_f32(0x3c00) == 1.0f);
        if (k == 1) assert_int_equal(h[6], 0x3c00); /* tie to even */
        st_safetensors_close(s);
    }
    st_st_write_item it = {"x", x, 1, {N}};
    char path[512];
    snprintf(path, sizeof path, "%s/bad.safetensors", st_test_dir);
    assert_int_equal(st_safetensors_write_as(path, 1, &it, NULL, ST_DTYPE_I8), ST_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),     cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_f16_exhaustive), cmocka_unit_test(test_upcast_file),
        cmocka_unit_test(test_truncated),     cmocka_unit_test(test_header_length),
        cmocka_unit_test(test_bad_entries),   cmocka_unit_test(test_bad_index),
        cmocka_unit_test(test_writer_errors), cmocka_unit_test(test_write_half),
        cmocka_unit_test(test_stream_writer),
    };
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
