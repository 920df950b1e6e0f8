/* test_ckpt.c — checkpoint layout arithmetic and a one-rank save/load round trip.
 *  - checksum: equals an independent re-statement of the definition; partial sums over any split add
 *    up to the whole; moving or changing one value changes it.
 *  - range slabs: for many shapes and ranges, the boxes cover exactly the flat range, in order, with
 *    at most three boxes.
 *  - even split: covers [0, n) without gaps for any world size.
 *  - chunk layout: chunks are whole rows of at most ~ST_CKPT_CHUNK_BYTES; the /model parts of the
 *    ranks tile each tensor exactly, every chunk inside one rank's part, one-chunk tensors rotate.
 *  - range selection: through st_ckpt_select_range, reading and writing any flat range of a small
 *    2-D and 1-D dataset touches exactly that range, at the window position it reports.
 *  - save/load: a tiny model's weights and optimizer state survive st_ckpt_save + load; a model of
 *    another shape is refused naming the tensor; verify passes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <mpi.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "kernels/kernels.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/optim.h"

static uint64_t ref_mix(uint64_t x) { /* the doc's definition, written out again */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static void test_checksum(void **state) {
    (void)state;
    float x[257];
    for (int i = 0; i < 257; i++) x[i] = (float)(i * 0.37 - 40.0);
    uint64_t want = 0;
    for (int i = 0; i < 257; i++) {
        uint32_t b;
        memcpy(&b, &x[i], 4);
        want += ref_mix((uint64_t)i * 0x9E3779B97F4A7C15ULL ^ b);
    }
    assert_true(st_ckpt_checksum(x, 0, 257) == want);
    for (int cut = 0; cut <= 257; cut += 17) /* additivity over any split */
        assert_true(st_ckpt_checksum(x, 0, (size_t)cut) + st_ckpt_checksum(x + cut, (uint64_t)cut, 257 - (size_t)cut) == want);
    float y[257];
    memcpy(y, x, sizeof x);
    y[3] = x[4]; y[4] = x[3]; /* swap: position-keyed */
    assert_true(st_ckpt_checksum(y, 0, 257) != want);
    memcpy(y, x, sizeof x);
    uint32_t b;
    memcpy(&b, &y[100], 4); b ^= 1; memcpy(&y[100], &b, 4); /* one bit */
    assert_true(st_ckpt_checksum(y, 0, 257) != want);
}

static void test_slabs(void **state) {
    (void)state;
    int64_t shapes[][2] = {{1, 1}, {1, 7}, {5, 1}, {4, 6}, {7, 3}, {3, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t R = shapes[s][0], C = shapes[s][1];
        uint64_t n = (uint64_t)(R * C);
        for (int nd = 1; nd <= 2; nd++) {
            int64_t shape[2] = {nd == 1 ? (int64_t)n : R, C};
            for (uint64_t a = 0; a <= n; a++)
                for (uint64_t b = a; b <= n; b++) {
                    st_ckpt_slab sl[3];
                    int k = st_ckpt_range_slabs(nd, shape, a, b, sl);
                    assert_true(k >= 0 && k <= 3);
                    if (a == b) { assert_int_equal(k, 0); continue; }
                    uint64_t next = a; /* boxes enumerate exactly a, a+1, ..., b-1 in order */
                    for (int j = 0; j < k; j++) {
                        uint64_t rows = sl[j].count[0], cols = nd == 1 ? 1 : sl[j].count[1];
                        for (uint64_t r = 0; r < rows; r++)
                            for (uint64_t c = 0; c < cols; c++) {
                                uint64_t flat = nd == 1 ? sl[j].start[0] + r : (sl[j].start[0] + r) * (uint64_t)C + sl[j].start[1] + c;
                                assert_true(flat == next);
                                next++;
                            }
                    }
                    assert_true(next == b);
                }
        }
    }
}

static void test_even_split(void **state) {
    (void)state;
    for (uint64_t n = 0; n < 40; n++)
        for (int w = 1; w <= 7; w++) {
            uint64_t prev = 0;
            for (int r = 0; r < w; r++) {
                uint64_t lo, hi;
                st_ckpt_even_split(n, w, r, &lo, &hi);
                assert_true(lo == prev && hi >= lo);
                prev = hi;
            }
            assert_true(prev == n);
        }
}

static void test_chunk_layout(void **state) {
    (void)state;
    const uint64_t target = ST_CKPT_CHUNK_BYTES / 4;
    int64_t shapes[][3] = {{2, 8192, 256}, {2, 3, 300000}, {1, 5000, 1}, {1, 3000000, 1}, {2, 100, 7},
                           {2, 1, 1}, {2, 4097, 1000}, {1, 1, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int nd = (int)shapes[s][0];
        int64_t shape[2] = {shapes[s][1], shapes[s][2]};
        uint64_t rows = (uint64_t)shape[0], cols = nd == 2 ? (uint64_t)shape[1] : 1, numel = rows * cols;
        uint64_t chunk[2];
        st_ckpt_chunk_shape(nd, shape, chunk);
        assert_true(chunk[1] == cols && chunk[0] >= 1 && chunk[0] <= rows);
        assert_true(chunk[0] == 1 || chunk[0] * cols <= target);        /* not above the target ... */
        assert_true(chunk[0] == rows || (chunk[0] + 1) * cols > target); /* ... and not needlessly small */
        uint64_t chunk_elems = chunk[0] * cols;
        for (int w = 1; w <= 5; w++)
            for (int t = 0; t < 4; t++) {
                uint64_t covered = 0, lo[5], hi[5];
                for (int r = 0; r < w; r++) {
                    st_ckpt_model_part(nd, shape, w, r, t, &lo[r], &hi[r]);
                    assert_true(lo[r] <= hi[r] && hi[r] <= numel);
                    if (lo[r] < hi[r]) { /* whole chunks: starts on a chunk, ends on one or at the end */
                        assert_true(lo[r] % chunk_elems == 0);
                        assert_true(hi[r] % chunk_elems == 0 || hi[r] == numel);
                    }
                    covered += hi[r] - lo[r];
                }
                assert_true(covered == numel); /* disjoint and complete: every element has one writer */
                for (int r = 0; r < w; r++)
                    for (int q = 0; q < w; q++)
                        if (q != r && lo[r] < hi[r] && lo[q] < hi[q]) assert_true(hi[r] <= lo[q] || hi[q] <= lo[r]);
                if (t == 0 && numel <= chunk_elems) { /* one chunk: its owner moves with the tensor index */
                    int seen = 0;
                    for (int tt = 0; tt < w; tt++)
                        for (int r = 0; r < w; r++) {
                            uint64_t a1, b1;
                            st_ckpt_model_part(nd, shape, w, r, tt, &a1, &b1);
                            if (b1 > a1) seen |= 1 << r;
                        }
                    assert_int_equal(seen, (1 << w) - 1); /* w consecutive tensors: every rank writes one */
                }
            }
    }
}

/* Reads (then writes) every flat range of a [R, C] (or 1-D) dataset holding value = flat index. */
static void check_select(hid_t f, int nd, int64_t R, int64_t C) {
    int64_t shape[2] = {R, nd == 2 ? C : 1};
    uint64_t n = (uint64_t)(shape[0] * shape[1]);
    hsize_t dims[2] = {(hsize_t)shape[0], (hsize_t)shape[1]};
    hid_t sp = H5Screate_simple(nd, dims, NULL);
    char name[32];
    snprintf(name, sizeof name, "t%d_%lld", nd, (long long)R);
    hid_t d = H5Dcreate2(f, name, H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(d >= 0);
    float *all = malloc(n * sizeof(float)), *win = malloc((n + 1) * sizeof(float));
    for (uint64_t i = 0; i < n; i++) all[i] = (float)i;
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all) >= 0);
    for (uint64_t a = 0; a <= n; a++)
        for (uint64_t b = a; b <= n; b++) {
            hid_t fs = H5Dget_space(d);
            size_t lead = 99, window = 99;
            hid_t ms = st_ckpt_select_range(fs, nd, shape, a, b, &lead, &window);
            assert_true(ms >= 0);
            if (a == b) {
                assert_true(window == 0 && H5Sget_select_npoints(fs) == 0 && H5Sget_select_npoints(ms) == 0);
            } else {
                uint64_t Cw = (uint64_t)shape[1], r0 = a / Cw, r1 = (b + Cw - 1) / Cw; /* rows spanned */
                assert_true(lead == a - r0 * Cw && window == (r1 - r0) * Cw);
                for (size_t k = 0; k < window; k++) win[k] = -1.0f;
                assert_true(H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, win) >= 0);
                for (size_t k = 0; k < window; k++) { /* exactly the range, at lead, nothing else touched */
                    int inside = k >= lead && k < lead + (b - a);
                    assert_true(win[k] == (inside ? (float)(a + (k - lead)) : -1.0f));
                }
            }
            H5Sclose(ms);
            H5Sclose(fs);
        }
    /* writing through a window: a middle range becomes negative, the rest stays */
    uint64_t a = n / 3, b = n - n / 4;
    hid_t fs = H5Dget_space(d);
    size_t lead, window;
    hid_t ms = st_ckpt_select_range(fs, nd, shape, a, b, &lead, &window);
    for (size_t k = 0; k < window; k++) win[k] = -(float)k - 1000.0f;
    if (a < b) assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, win) >= 0);
    H5Sclose(ms);
    H5Sclose(fs);
    assert_true(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all) >= 0);
    for (uint64_t i = 0; i < n; i++)
        assert_true(all[i] == (i >= a && i < b ? -(float)(i - a + lead) - 1000.0f : (float)i));
    free(all);
    free(win);
    H5Dclose(d);
    H5Sclose(sp);
}

static void test_select_range(void **state) {
    (void)state;
    char path[] = "/tmp/st_test_select_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    check_select(f, 2, 7, 5);
    check_select(f, 2, 1, 6);
    check_select(f, 2, 4, 1);
    check_select(f, 1, 13, 1);
    H5Fclose(f);
    unlink(path);
}

static void build(st_model *m, int d_ff, const st_backend *be) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.family = ST_FAMILY_LLAMA;
    c.n_layer = 2; c.d_model = 32; c.n_head = 4; c.n_kv_head = 2; c.head_dim = 8; c.d_ff = d_ff;
    c.vocab = 64; c.max_seq = 32; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f; c.bos_id = -1; c.eos_id = -1;
    assert_int_equal(st_model_build(m, &c, be), 0);
}

static void test_roundtrip(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(1);
    st_model m;
    build(&m, 48, be);
    assert_int_equal(st_model_init_random(&m, 5), 0);
    unsigned char layers[2] = {0, 1}; /* only layer 1 (+ its modules) trains: optim covers a subset */
    m.grad_align = 1;
    assert_int_equal(st_model_set_trainable(&m, layers, ST_MOD_ALL), 0);
    st_optim o;
    memset(&o, 0, sizeof o);
    st_optim_config oc = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f};
    assert_int_equal(st_optim_init(&o, &oc, 0, m.grad_alloc, &m, be), 0);
    for (size_t i = 0; i < m.grad_alloc; i++) { o.m[i] = (float)i * 0.5f; o.v[i] = (float)i + 0.25f; }
    for (int i = 0; i < m.n_params; i++) o.param_step[i] = m.params[i].grad_offset >= 0 ? 1 + i % 12 : 0; /* <= the checkpoint step (verify checks it) */
    char dir[] = "/tmp/st_test_ckpt_XXXXXX";
    assert_non_null(mkdtemp(dir));
    st_ckpt_meta meta = {.step = 12, .tokens_seen = 99, .last_loss = 2.5, .job_spec = "{}", .model_config = "{}"};
    char name[ST_CKPT_NAME_MAX];
    int rc = st_ckpt_save(MPI_COMM_WORLD, dir, &m, &o, &meta, 0, name, NULL);
    if (rc) fprintf(stderr, "%s\n", st_error());
    assert_int_equal(rc, 0);
    assert_string_equal(name, "step-00000012.h5");
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int n = 0;
    assert_int_equal(st_ckpt_verify(path, &n), 0);
    int trainable = 0;
    for (int i = 0; i < m.n_params; i++) trainable += m.params[i].grad_offset >= 0;
    assert_int_equal(n, m.n_params + 2 * trainable);
    float *w = malloc(m.n_weights * sizeof(float)), *mm = malloc(m.grad_alloc * 4), *vv = malloc(m.grad_alloc * 4);
    int *steps = calloc((size_t)m.n_params, sizeof(int));
    assert_int_equal(st_ckpt_load_model(path, &m, w), 0);
    assert_memory_equal(w, m.weights, m.n_weights * sizeof(float));
    assert_int_equal(st_ckpt_load_optim(MPI_COMM_WORLD, path, &m, 0, m.grad_alloc, mm, vv, steps), 0);
    assert_memory_equal(mm, o.m, m.n_grads * sizeof(float));
    assert_memory_equal(vv, o.v, m.n_grads * sizeof(float));
    for (int i = 0; i < m.n_params; i++)
        if (m.params[i].grad_offset >= 0) assert_int_equal(steps[i], o.param_step[i]);
    st_ckpt_info info;
    assert_int_equal(st_ckpt_read_info(path, &info), 0);
    assert_true(info.step == 12 && info.tokens_seen == 99 && info.world_size == 1 && info.last_loss == 2.5);
    st_ckpt_info_free(&info);
    /* another FFN size: refused, naming the tensor */
    st_model other;
    build(&other, 40, be);
    float *w2 = malloc(other.n_weights * sizeof(float));
    assert_int_equal(st_ckpt_load_model(path, &other, w2), ST_ESHAPE);
    assert_non_null(strstr(st_error(), "mlp.gate_proj.weight has shape [48, 32], the model expects [40, 32]"));
    free(w2);
    st_model_free(&other);
    free(w); free(mm); free(vv); free(steps);
    st_optim_free(&o, be);
    free(o.param_step);
    st_model_free(&m);
    unlink(path);
    snprintf(path, sizeof path, "%s/latest", dir);
    unlink(path);
    rmdir(dir);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checksum),
        cmocka_unit_test(test_slabs),
        cmocka_unit_test(test_even_split),
        cmocka_unit_test(test_chunk_layout),
        cmocka_unit_test(test_select_range),
        cmocka_unit_test(test_roundtrip),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
