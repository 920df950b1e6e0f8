/* test_cuda_host.c — the CUDA backend's host-side logic, tested without a GPU: launch geometry / shared-memory / scratch sizing, bf16 rounding, and the no-device path of
 * st_backend_cuda(), the device each node-local rank takes. (Gradient buckets are worker/comm.c's, checked
 * through real MPI runs and the fake-NCCL stream-order tool.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/bf16.h"
#include "kernels/cuda/launch_host.h"
#include "kernels/kernels.h"
#ifdef ST_HAVE_CUDA
#include "kernels/cuda/cuda_extras.h"
#endif

/* ---------------------------------------------------------------- launch geometry */

static void test_grid_and_reduce_blocks(void **state) {
    (void)state;
    assert_int_equal(st_cuda_grid_1d(0, 256), 1);
    assert_int_equal(st_cuda_grid_1d(257, 256), 2);
    assert_int_equal(st_cuda_grid_1d((size_t)1 << 40, 256), ST_CUDA_MAX_GRID);
    assert_int_equal(st_cuda_reduce_blocks(1), 1);
    assert_int_equal(st_cuda_reduce_blocks((size_t)1 << 40), ST_CUDA_REDUCE_BLOCKS);
    /* the partition must depend on n only: same n, same answer */
    assert_int_equal(st_cuda_reduce_blocks(123457), st_cuda_reduce_blocks(123457));
}

static void test_colsum_partials_cover_and_fit(void **state) {
    (void)state;
    int ns[] = {1, 5, 16, 17, 100, 4096, 100000};
    int cs[] = {1, 64, 768, 4096, 16384};
    size_t scratch[] = {64, 1u << 16, 1u << 24};
    for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
        for (size_t b = 0; b < sizeof cs / sizeof *cs; b++)
            for (size_t s = 0; s < sizeof scratch / sizeof *scratch; s++)
                for (int arrays = 1; arrays <= 2; arrays++) {
                    int parts = st_cuda_colsum_partials(ns[a], cs[b], arrays, scratch[s]);
                    if ((size_t)cs[b] * arrays > scratch[s]) {
                        assert_int_equal(parts, 0);
                        continue;
                    }
                    assert_true(parts >= 1 && parts <= ST_CUDA_COLSUM_MAX_PARTIALS);
                    assert_true((size_t)parts * cs[b] * arrays <= scratch[s]);
                    int rpc = st_cuda_colsum_rows_per_chunk(ns[a], parts);
                    assert_true((long)rpc * parts >= ns[a]);
                }
}

static void test_attention_limits(void **state) {
    (void)state;
    int hds[] = {16, 32, 64, 80, 96, 128};
    for (size_t i = 0; i < sizeof hds / sizeof *hds; i++) {
        assert_int_equal(st_cuda_attn_check(2, 64, 8, 2, hds[i]), 0);
        assert_true(st_cuda_attn_fwd_smem(hds[i]) <= ST_CUDA_SMEM_LIMIT);
        assert_true(st_cuda_attn_bwd_kv_smem(hds[i]) <= ST_CUDA_SMEM_LIMIT);
    }
    /* the K/V tiles alone need 2 * 32 * (hd + 1) floats */
    assert_true(st_cuda_attn_fwd_smem(64) >= 2 * 32 * 65 * sizeof(float));
    assert_int_equal(st_cuda_attn_check(2, 64, 8, 2, 256), ST_ESHAPE);
    assert_non_null(strstr(st_error(), "head_dim 256"));
    assert_int_equal(st_cuda_attn_check(2, 64, 6, 4, 64), ST_ESHAPE);
    assert_int_equal(st_cuda_attn_check(0, 64, 8, 2, 64), ST_EINVAL);
    assert_int_equal(st_cuda_attn_bwd_scratch_floats(2, 64, 8), 2 * 64 * 8);
    assert_true(st_cuda_xent_scratch_bytes(1000) >= 1000 * sizeof(double));
    assert_int_equal(st_cuda_mt_launches(0), 0);
    assert_int_equal(st_cuda_mt_launches(ST_CUDA_MT_MAX_TENSORS), 1);
    assert_int_equal(st_cuda_mt_launches(ST_CUDA_MT_MAX_TENSORS + 1), 2);
}

/* ---------------------------------------------------------------- bf16 */

/* Reference: the two bf16 neighbours of f, chosen by distance in double, ties to the even one. */
static float bf16_reference(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t lo_bits = u & 0xffff0000u, hi_bits = lo_bits + 0x10000u;
    float lo, hi;
    memcpy(&lo, &lo_bits, 4);
    memcpy(&hi, &hi_bits, 4);
    double dl = fabs((double)f - (double)lo), dh = fabs((double)hi - (double)f);
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return ((lo_bits >> 16) & 1u) ? hi : lo;
}

static void test_bf16_rounding(void **state) {
    (void)state;
    srand(99);
    for (int i = 0; i < 100000; i++) {
        uint32_t u = ((uint32_t)rand() << 16) ^ (uint32_t)rand();
        float f;
        memcpy(&f, &u, 4);
        if (!isfinite(f) || fabsf(f) > 3.0e38f) continue;
        float got = st_bf16_bits_to_float(st_float_to_bf16_bits(f));
        float want = bf16_reference(f);
        assert_memory_equal(&got, &want, 4);
    }
    assert_true(st_bf16_bits_to_float(st_float_to_bf16_bits(1.0f + 1.0f / 256)) == 1.0f); /* tie -> even */
    assert_true(st_bf16_bits_to_float(st_float_to_bf16_bits(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);
    assert_true(isnan(st_bf16_bits_to_float(st_float_to_bf16_bits(NAN))));
    assert_true(isinf(st_bf16_bits_to_float(st_float_to_bf16_bits(INFINITY))));
}

/* ---------------------------------------------------------------- device lookup */

/* Which GPU each node-local rank takes: one visible device -> 0; else one device per rank, and a clear
 * refusal when the node has more ranks than devices (NCCL would reject two ranks on one GPU). */
static void test_pick_device(void **state) {
    (void)state;
    int d = -1;
    for (int r = 0; r < 4; r++) { /* 4 ranks, 4 or 8 devices: rank r on device r, all distinct */
        assert_int_equal(st_cuda_pick_device(r, 4, 4, &d), 0);
        assert_int_equal(d, r);
        assert_int_equal(st_cuda_pick_device(r, 4, 8, &d), 0);
        assert_int_equal(d, r);
        assert_int_equal(st_cuda_pick_device(r, 4, 1, &d), 0); /* bound by the launcher */
        assert_int_equal(d, 0);
    }
    assert_int_equal(st_cuda_pick_device(2, 3, 2, &d), ST_EDEVICE);
    assert_non_null(strstr(st_error(), "3 ranks on this node but only 2 CUDA devices"));
    assert_int_equal(st_cuda_pick_device(0, 1, 0, &d), ST_EDEVICE);
    assert_int_equal(st_cuda_pick_device(3, 3, 4, &d), ST_EINVAL);
    assert_int_equal(st_cuda_pick_device(-1, 3, 4, &d), ST_EINVAL);
}

/* Two node-local ranks on one GPU are found by their device UUIDs (the pair, lowest first). */
static void test_shared_device(void **state) {
    (void)state;
    unsigned char ids[4 * 16];
    for (int r = 0; r < 4; r++) memset(ids + 16 * r, 0x10 + r, 16);
    int a = -1, b = -1;
    assert_int_equal(st_cuda_shared_device(ids, 4, &a, &b), 0);
    ids[3 * 16 + 15] = 0x11; /* rank 3's last byte differs from rank 1's only there */
    assert_int_equal(st_cuda_shared_device(ids, 4, &a, &b), 0);
    memcpy(ids + 3 * 16, ids + 1 * 16, 16); /* now equal */
    assert_int_equal(st_cuda_shared_device(ids, 4, &a, &b), 1);
    assert_int_equal(a, 1);
    assert_int_equal(b, 3);
    assert_int_equal(st_cuda_shared_device(ids, 1, &a, &b), 0);
}

/* Every slot of a backend table after `name` and `host_memory` is a function pointer, and none may be
 * NULL: the worker calls them unconditionally — except the optional slots at the end, checked apart: the int8
 * teacher's (w8_bytes onward: a backend without them refuses distill.teacher_dtype int8 by name; cpu and cuda
 * have them) and QLoRA's fused qmatmul (without it the base is dequantized a unit at a time). */
static void assert_every_slot_set(const st_backend *be) {
    typedef void (*fn)(void);
    size_t first = offsetof(st_backend, alloc), slots = (offsetof(st_backend, w8_bytes) - first) / sizeof(fn);
    assert_int_equal((sizeof(st_backend) - first) % sizeof(fn), 0); /* only function pointers follow */
    assert_int_equal(sizeof(st_backend) - offsetof(st_backend, w8_bytes), 5 * sizeof(fn)); /* the 5 optional */
    assert_true(slots >= 30);
    for (size_t i = 0; i < slots; i++) {
        fn f;
        memcpy(&f, (const char *)be + first + i * sizeof(fn), sizeof f);
        if (!f) fail_msg("%s backend: slot %zu (after alloc) is NULL", be->name, i);
    }
}

static void test_tables_complete(void **state) {
    (void)state;
    const st_backend *cpu = st_backend_cpu(1);
    assert_every_slot_set(cpu);
    assert_int_equal(cpu->host_memory, 1);
    assert_true(cpu->w8_bytes && cpu->w8_scratch_bytes && cpu->w8_pack && cpu->matmul_w8a8); /* the int8 teacher */
    assert_non_null(cpu->qmatmul); /* QLoRA's fused dequantize-matmul (kernels/cpu/cpu_qmatmul.c) */
#ifdef ST_HAVE_CUDA /* the table itself, no device needed */
    assert_every_slot_set(st_cuda_table());
    assert_true(st_cuda_table()->w8_bytes && st_cuda_table()->w8_scratch_bytes && st_cuda_table()->w8_pack &&
                st_cuda_table()->matmul_w8a8); /* the int8 teacher (kernels/cuda/int8.cu) */
    assert_non_null(st_cuda_table()->qmatmul); /* kernels/cuda/qmatmul.cu */
    assert_int_equal(st_cuda_table()->host_memory, 0);
    assert_string_equal(st_cuda_table()->name, "cuda");
    /* the tensor-core attention refuses shapes it has no kernel for before touching the device */
    assert_int_equal(st_cuda_attention_tc_fwd(NULL, NULL, NULL, 1, 16, 4, 2, 96), ST_EINVAL);
    assert_non_null(strstr(st_error(), "head_dim 96"));
    assert_int_equal(st_cuda_attention_tc_bwd(NULL, NULL, NULL, NULL, NULL, 1, 16, 4, 3, 64), ST_EINVAL);
#endif
}

static void test_backend_cuda_without_device(void **state) {
    (void)state;
    st_fail(0, "%s", "");
    const st_backend *be = st_backend_cuda(0);
    if (be) { /* a GPU machine: the table must be complete */
#ifdef ST_HAVE_CUDA
        assert_ptr_equal(be, st_cuda_table());
#endif
        return;
    }
    /* here: built without CUDA, or CUDA built but no driver/device; either way one clear line */
    const char *msg = st_error();
    assert_true(strlen(msg) > 10);
    assert_true(strstr(msg, "CUDA") != NULL);
    assert_null(strchr(msg, '\n'));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grid_and_reduce_blocks),
        cmocka_unit_test(test_colsum_partials_cover_and_fit),
        cmocka_unit_test(test_attention_limits),
        cmocka_unit_test(test_bf16_rounding),
        cmocka_unit_test(test_pick_device),
        cmocka_unit_test(test_shared_device),
        cmocka_unit_test(test_tables_complete),
        cmocka_unit_test(test_backend_cuda_without_device),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
