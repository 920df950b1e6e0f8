/* fakedev.c — `shardtune train` (or `generate` / `compare`) on a "device" backend that catches host/device
 * mix-ups and can fail a chosen kernel, so the trainer's and generation's device paths are tested without a GPU.
 *
 *   fakedev [--guard] [--fail KERNEL:CALL[@RANK]] JOB.yaml [a.b=value ...]
 *   fakedev [--guard] generate|compare ARGS...   (the command's own flags; its --backend is ignored)
 *   fakedev --guard-self-test
 *
 * The backend is the CPU backend under the name "fakedev" (installed with st_backend_set_override, so the
 * job's `backend` key is ignored):
 *  --guard: its alloc hands out "device" memory from a registry of tagged ranges and it says host_memory 0
 *    (as CUDA does). copy_to_device must go host -> device, copy_to_host device -> host, copy and memset0
 *    device only, free only a registered start; the operands of matmul, copy_cols, add_scalar, lora_dropout,
 *    dora_norm, dora_apply, dora_bwd, scale_rows, prompt_act, prompt_act_bwd, dequant_nf4, dequant_int8 and qmatmul (the kernels the PEFT adapters call, worker/lora.c, worker/qlora.c),
 *    w8_pack and matmul_w8a8 (the int8 teacher: the CPU kernels, bit-identical to kernels/cuda/int8.cu), and
 *    generation's from_bf16, decode_mm, kv_store, attention_cached and embedding_fwd device only. A violation (host memory where device memory belongs,
 *    e.g. a host buffer passed to a device-to-device copy) is printed and recorded in the backend's
 *    status, so the next step boundary stops training with it, as a GPU would have crashed. With several
 *    ranks worker/comm.c then takes its NCCL path: the fake NCCL of nccl_fake.h (collectives run through
 *    MPI when the compute stream waits; a stream-order violation is printed and recorded in the status).
 *    FAKEDEV_REPORT_MEM=1 prints each rank's device bytes at exit: the peak, and the most allocated at a
 *    step boundary (generate / compare: none, 0) (what `shardtune plan` calls the step total); also the gradient reductions (reduce-
 *    scatters) through the fake NCCL and how many of them were queued while a matmul ran (overlap), device
 *    ZeRO-3's head-block gathers and the head passes they served (worker/comm_zero3_dev.h st_z3dev_head_counts),
 *    and the peaks when the status was first and second asked (device ZeRO-3 training asks once its load is done
 *    and, resuming, once its resume is: the load's peak, then the resume's), device ZeRO-3's stage-change traffic
 *    (st_z3dev_move_counts) and the bytes the fake NCCL's point-to-point delivered to the rank.
 *  --fail KERNEL:CALL[@RANK]: the CALL-th call (from 1) of KERNEL (matmul, matmul_bf16, attention_fwd,
 *    attention_bwd, cross_entropy (the LM head's loss kernels too: cross_entropy_acc, xent_block_loss),
 *    adamw_multi) records a failure in the status, on every rank or only on
 *    RANK; the kernel itself still runs (like a GPU kernel whose fault is only seen later).
 *  --guard-self-test: checks that the guard catches a host buffer in a device copy and a host kernel
 *    operand (copy_cols), and exits.
 * Exit status and output are those of the command; a guard violation the command's own status checks did not
 * see (generation never asks) makes it 1. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "coordinator/cli/commands.h"
#include "kernels/kernels.h"
#include "worker/comm_zero3_dev.h"
#include "tests/tools/nccl_fake.h" /* several guarded ranks: NCCL, faked with its stream-order checks */

static st_backend fake;
static const st_backend *cpu;
static char failure[512]; /* the recorded status, "" if none */

static int my_rank(void) {
    int init = 0, rank = 0;
    MPI_Initialized(&init);
    if (init) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

static void record(const char *fmt, const char *a, const char *b) {
    if (failure[0]) return; /* the first failure, as the CUDA backend keeps it */
    snprintf(failure, sizeof failure, fmt, a, b);
    fprintf(stderr, "fakedev (rank %d): %s\n", my_rank(), failure);
}

static size_t dev_bytes, dev_peak, dev_between; /* allocated now, at most, at most at a step boundary */
static size_t dev_first[2]; /* the peak when the status was first and second asked: a device ZeRO-3 trainer asks
                               once its load is done (train.c setup) and once its resume is (train_ckpt.c) */
static int status_rank; /* this rank (read while MPI runs) */
static int asked;

static int fake_status(void) {
    if (asked < 2) dev_first[asked++] = dev_peak;
    if (dev_bytes > dev_between) dev_between = dev_bytes; /* the trainer asks at every step boundary */
    status_rank = my_rank();
    if (violations && !failure[0]) record("%s%s", "the fake NCCL's stream order was violated (see above)", "");
    violations = 0;
    if (!failure[0]) return 0;
    st_fail(ST_EDEVICE, "%s", failure);
    failure[0] = 0;
    return ST_EDEVICE;
}

/* ---------------------------------------------------------------- tagged "device" memory */

typedef struct { char *lo, *hi; } range;
static range *ranges;
static size_t n_ranges, cap_ranges;

static int is_device(const void *p) {
    const char *c = p;
    for (size_t i = 0; i < n_ranges; i++)
        if (c >= ranges[i].lo && c < ranges[i].hi) return 1;
    return 0;
}

static void *guard_alloc(size_t bytes) {
    if (n_ranges == cap_ranges) {
        size_t nc = cap_ranges ? 2 * cap_ranges : 256;
        range *nr = realloc(ranges, nc * sizeof *nr);
        if (!nr) return NULL;
        ranges = nr, cap_ranges = nc;
    }
    char *p = st_calloc_aligned(bytes ? bytes : 1);
    if (!p) return NULL;
    status_rank = my_rank(); /* generation never asks for the status: the rank for the memory report */
    ranges[n_ranges].lo = p, ranges[n_ranges].hi = p + (bytes ? bytes : 1);
    n_ranges++;
    dev_bytes += bytes ? bytes : 1;
    if (dev_bytes > dev_peak) dev_peak = dev_bytes;
    return p;
}

static void guard_free(void *p) {
    if (!p) return;
    for (size_t i = 0; i < n_ranges; i++)
        if (ranges[i].lo == p) {
            dev_bytes -= (size_t)(ranges[i].hi - ranges[i].lo);
            ranges[i] = ranges[--n_ranges];
            free(p);
            return;
        }
    record("free: %s%s is not a device allocation (host memory passed to the backend's free)", "", "");
}

static void need(int ok, const char *what, const char *which) {
    if (!ok) record("%s: %s", what, which);
}

static void guard_memset0(void *p, size_t bytes) {
    if (bytes) need(is_device(p), "memset0", "the buffer is host memory");
    cpu->memset0(p, bytes);
}
static void guard_copy(void *dst, const void *src, size_t bytes) {
    check_read(src, bytes, "copy");
    if (bytes) {
        need(is_device(dst), "copy (device to device)", "the destination is host memory");
        need(is_device(src), "copy (device to device)", "the source is host memory");
    }
    cpu->copy(dst, src, bytes);
}
static void guard_to_device(void *dst, const void *src, size_t bytes) {
    if (bytes) {
        need(is_device(dst), "copy_to_device", "the destination is host memory");
        need(!is_device(src), "copy_to_device", "the source is device memory");
    }
    cpu->copy_to_device(dst, src, bytes);
}
static void guard_to_host(void *dst, const void *src, size_t bytes) {
    check_read(src, bytes, "copy_to_host");
    if (bytes) {
        need(!is_device(dst), "copy_to_host", "the destination is device memory");
        need(is_device(src), "copy_to_host", "the source is host memory");
    }
    cpu->copy_to_host(dst, src, bytes);
}

/* kernel operands: each non-NULL pointer must lie in device memory */
static void operands(const char *kernel, int n, const void *const *p) {
    for (int i = 0; i < n; i++)
        if (p[i] && !is_device(p[i])) record("%s: operand %s is host memory", kernel, (const char *[]){"0", "1", "2", "3"}[i]);
}
static void guard_copy_cols(float *dst, int ldd, const float *src, int lds, int rows, int cols, int acc) {
    if (rows > 0 && cols > 0) operands("copy_cols", 2, (const void *[]){dst, src});
    cpu->copy_cols(dst, ldd, src, lds, rows, cols, acc);
}
static void guard_bias_add(float *y, const float *bias, int n, int c) { /* ZeRO-3 adds received sums with it */
    check_read(bias, (size_t)c * sizeof(float), "bias_add");
    if (n > 0 && c > 0) operands("bias_add", 2, (const void *[]){y, bias});
    cpu->bias_add(y, bias, n, c);
}
static void guard_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (n) operands("to_bf16", 2, (const void *[]){dst, src});
    cpu->to_bf16(dst, src, n);
}
static void guard_from_bf16(float *dst, const uint16_t *src, size_t n) { /* device ZeRO-3 widens gathered bf16 runs */
    check_read(src, n * sizeof(uint16_t), "from_bf16");
    if (n) operands("from_bf16", 2, (const void *[]){dst, src});
    cpu->from_bf16(dst, src, n);
}
/* generation's kernels (worker/generate.c): a held bf16 weight or a cache must be device memory, as on a GPU */
static void guard_decode_mm(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                            float beta) {
    if (rows > 0 && out > 0) operands("decode_mm", 4, (const void *[]){y, x, w, w16});
    cpu->decode_mm(y, x, w, w16, rows, out, in, beta);
}
static void guard_kv_store(float *kc, float *vc, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                           int rows, int h, int kvh, int hd, int max_t) {
    if (rows > 0) operands("kv_store", 4, (const void *[]){kc, vc, qkv, row_seq}), operands("kv_store", 1, (const void *[]){row_pos});
    cpu->kv_store(kc, vc, qkv, row_seq, row_pos, rows, h, kvh, hd, max_t);
}
static void guard_attention_cached(float *out, const float *qkv, const float *kc, const float *vc,
                                   const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                                   int max_t, int window) {
    if (rows > 0) operands("attention_cached", 4, (const void *[]){out, qkv, kc, vc}),
        operands("attention_cached", 2, (const void *[]){row_seq, row_pos});
    cpu->attention_cached(out, qkv, kc, vc, row_seq, row_pos, rows, h, kvh, hd, max_t, window);
}
static void guard_embedding_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                                int c) {
    if (b > 0 && t > 0) operands("embedding_fwd", 4, (const void *[]){out, tokens, wte, wpe});
    cpu->embedding_fwd(out, tokens, wte, wpe, b, t, c);
}
static void guard_add_scalar(float *x, float v, size_t n) {
    if (n) operands("add_scalar", 1, (const void *[]){x});
    cpu->add_scalar(x, v, n);
}
static void guard_lora_dropout(float *out, const float *x, const float *add, int rows, int in, int t, uint64_t key,
                               int64_t sample0, int k, uint64_t thresh, float inv) {
    if (rows > 0 && in > 0) operands("lora_dropout", 3, (const void *[]){out, x, add});
    cpu->lora_dropout(out, x, add, rows, in, t, key, sample0, k, thresh, inv);
}
static void guard_dora_norm(float *c, float *inv, const float *w, const float *ba, const float *mg, int out, int in,
                            float scale) {
    if (out > 0) operands("dora_norm", 4, (const void *[]){c, inv, w, ba}), operands("dora_norm", 1, (const void *[]){mg});
    cpu->dora_norm(c, inv, w, ba, mg, out, in, scale);
}
static void guard_dora_apply(float *y, int ldy, const float *z, const float *base, const float *c, int rows, int out) {
    if (rows > 0 && out > 0) operands("dora_apply", 4, (const void *[]){y, z, base, c});
    cpu->dora_apply(y, ldy, z, base, c, rows, out);
}
static void guard_dora_bwd(float *gm, float *base, float *dy, const float *z, const float *c, const float *inv,
                           int rows, int out) {
    if (rows > 0 && out > 0) operands("dora_bwd", 4, (const void *[]){gm, base, dy, z}), operands("dora_bwd", 2, (const void *[]){c, inv});
    cpu->dora_bwd(gm, base, dy, z, c, inv, rows, out);
}
static void guard_scale_rows(float *w, const float *c, int out, int in) {
    if (out > 0 && in > 0) operands("scale_rows", 2, (const void *[]){w, c});
    cpu->scale_rows(w, c, out, in);
}
static void guard_prompt_act(float *r, const float *a, size_t n, int tanh_act) {
    if (n) operands("prompt_act", 2, (const void *[]){r, a});
    cpu->prompt_act(r, a, n, tanh_act);
}
static void guard_prompt_act_bwd(float *dx, const float *a, const float *r, size_t n, int tanh_act) {
    if (n) operands("prompt_act_bwd", 3, (const void *[]){dx, a, r});
    cpu->prompt_act_bwd(dx, a, r, n, tanh_act);
}
static void guard_dequant_int8(float *out, const int8_t *q, const float *scale, size_t n, int block) {
    if (n) operands("dequant_int8", 3, (const void *[]){out, q, scale});
    cpu->dequant_int8(out, q, scale, n, block);
}
/* QLoRA's fused matmul: every pointer device memory; a device backend is given no scratch (the CUDA kernel
 * tiles in shared memory), so the CPU twin runs on a scratch of its own here, as the GPU's shared memory */
static void guard_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta,
                          float *scratch, size_t scratch_floats) {
    (void)scratch, (void)scratch_floats;
    int rows = 0;
    for (int p = 0; p < w->nparts && p < ST_QW_PARTS; p++) {
        const st_qw_part *q = &w->part[p];
        operands("qmatmul", 4, (const void *[]){q->codes, q->scales, q->q8, q->scale2});
        /* device ZeRO-3 gathers these bytes on the comm stream: read only after the compute stream waited */
        size_t n = (size_t)q->rows * (size_t)w->cols, ns = w->block > 0 ? (n + (size_t)w->block - 1) / (size_t)w->block : 0;
        check_read(q->codes, w->nf4 ? (n + 1) / 2 : n, "qmatmul");
        if (q->scales) check_read(q->scales, ns * sizeof(float), "qmatmul");
        if (q->q8) check_read(q->q8, ns, "qmatmul");
        rows += q->rows;
    }
    operands("qmatmul", 3, (const void *[]){c, x.f32, x.bf16});
    size_t n = st_qmatmul_scratch_floats(m, rows, w->cols, trans, bf16, st_num_threads());
    float *own = malloc(n * sizeof(float) + sizeof(float));
    if (!own) { record("%s%s", "qmatmul: out of host memory for the scratch", ""); return; }
    cpu->qmatmul(c, x, w, m, trans, bf16, beta, own, n);
    free(own);
}
static void guard_dequant_nf4(float *out, const uint8_t *packed, const float *absmax, size_t n, int block) {
    if (n) operands("dequant_nf4", 3, (const void *[]){out, packed, absmax});
    cpu->dequant_nf4(out, packed, absmax, n, block);
}
/* The int8 teacher's kernels (kernels.h w8_pack, matmul_w8a8): the CPU's, which compute the CUDA backend's
 * function bit for bit (kernels/cuda/int8.cu), with their operands device memory, as there. */
static void guard_w8_pack(void *packed, const float *w, int out, int in) {
    if (out > 0 && in > 0) operands("w8_pack", 2, (const void *[]){packed, w});
    cpu->w8_pack(packed, w, out, in);
}
static void guard_matmul_w8a8(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                              float beta, void *scratch) {
    if (m > 0 && out > 0)
        operands("matmul_w8a8", 4, (const void *[]){c, a, packed, scratch}),
            operands("matmul_w8a8", 1, (const void *[]){bias});
    cpu->matmul_w8a8(c, a, packed, bias, m, out, in, beta, scratch);
}

/* ---------------------------------------------------------------- injected kernel failure */

static char fail_kernel[64];
static long fail_call, calls;
static int fail_rank = -1;

static void count_call(const char *kernel) {
    if (strcmp(kernel, fail_kernel) != 0) return;
    if (++calls != fail_call || (fail_rank >= 0 && fail_rank != my_rank())) return;
    record("fakedev %s: injected failure%s", kernel, " (as a launch error or illegal address would be)");
}

static int guarded;
static void f_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float alpha,
                     float beta) {
    compute_ran(); /* the gradient reductions queued now travel beside this matmul */
    if (guarded && m > 0 && n > 0) operands("matmul", k > 0 ? 3 : 1, (const void *[]){c, a, b});
    if (guarded && k > 0) { /* a weight still being gathered (a queued collective's output) is a race */
        check_read(a, (size_t)m * k * sizeof(float), "matmul");
        check_read(b, (size_t)k * n * sizeof(float), "matmul");
    }
    cpu->matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
    count_call("matmul");
}
static void f_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int ta, int tb,
                          float alpha, float beta, float *scratch) {
    compute_ran();
    if (guarded && k > 0) {
        check_read(a.f32 ? (const void *)a.f32 : (const void *)a.bf16, (size_t)m * k * (a.f32 ? 4 : 2), "matmul_bf16");
        check_read(b.f32 ? (const void *)b.f32 : (const void *)b.bf16, (size_t)k * n * (b.f32 ? 4 : 2), "matmul_bf16");
    }
    cpu->matmul_bf16(c, a, b, bias, m, n, k, ta, tb, alpha, beta, scratch);
    count_call("matmul_bf16");
}
static void f_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    cpu->attention_fwd(out, lse, qkv, b, t, h, kvh, hd);
    count_call("attention_fwd");
}
static void f_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                            int b, int t, int h, int kvh, int hd) {
    cpu->attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd);
    count_call("attention_bwd");
}
static double f_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v) {
    double r = cpu->cross_entropy(logits, loss, target, weight, n, v);
    count_call("cross_entropy");
    return r;
}
/* the LM head's form (worker/model.c): counted as "cross_entropy", the loss kernel a failure names */
static void f_cross_entropy_acc(float *logits, uint16_t *dl16, float *loss, const int32_t *target, const float *weight,
                                int n, int v, double *total) {
    cpu->cross_entropy_acc(logits, dl16, loss, target, weight, n, v, total);
    count_call("cross_entropy");
}
static void f_xent_block_loss(const float *stats, float *loss, const int32_t *target, const float *weight, int n, int v,
                              double *total) {
    cpu->xent_block_loss(stats, loss, target, weight, n, v, total);
    count_call("cross_entropy");
}
static void f_adamw_multi(const st_adamw_range *r, int count, float b1, float b2, float eps, float gs) {
    cpu->adamw_multi(r, count, b1, b2, eps, gs);
    count_call("adamw_multi");
}

static int parse_fail(const char *s) {
    static const char *known[] = {"matmul", "matmul_bf16", "attention_fwd", "attention_bwd", "cross_entropy",
                                  "adamw_multi"};
    const char *colon = strchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof fail_kernel) return -1;
    memcpy(fail_kernel, s, (size_t)(colon - s));
    fail_kernel[colon - s] = 0;
    char *end = NULL;
    fail_call = strtol(colon + 1, &end, 10);
    if (fail_call < 1) return -1;
    if (*end == '@') fail_rank = (int)strtol(end + 1, &end, 10);
    if (*end) return -1;
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (!strcmp(fail_kernel, known[i])) return 0;
    return -1;
}

/* --guard-self-test: the guard reports a host buffer passed as a device copy's destination. */
static int guard_self_test(void) {
    float host[4] = {0}, *dev = fake.alloc(sizeof host);
    fake.copy(host, dev, sizeof host);
    int rc = fake.status();
    printf("guard self-test: %s\n", rc ? st_error() : "NOT caught");
    fake.copy_cols(dev, 2, host, 2, 2, 1, 1); /* a kernel operand in host memory (a LoRA scratch on the host) */
    int rc2 = fake.status();
    printf("guard self-test: %s\n", rc2 ? st_error() : "NOT caught");
    fake.free(dev);
    return rc == ST_EDEVICE && rc2 == ST_EDEVICE && fake.status() == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    int guard = 0, self_test = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--guard")) guard = 1;
        else if (!strcmp(argv[i], "--guard-self-test")) guard = self_test = 1;
        else if (!strcmp(argv[i], "--fail") && i + 1 < argc && parse_fail(argv[i + 1]) == 0) i++;
        else {
            fprintf(stderr, "usage: fakedev [--guard] [--fail KERNEL:CALL[@RANK]] JOB.yaml [a.b=value ...]\n");
            return 2;
        }
    }
    cpu = st_backend_cpu(0);
    fake = *cpu;
    fake.name = "fakedev";
    fake.status = fake_status;
    if (guard) {
        fake.host_memory = 0;
        fake.alloc = guard_alloc, fake.free = guard_free, fake.memset0 = guard_memset0;
        fake.copy = guard_copy, fake.copy_to_device = guard_to_device, fake.copy_to_host = guard_to_host;
        fake.copy_cols = guard_copy_cols, fake.add_scalar = guard_add_scalar, fake.lora_dropout = guard_lora_dropout;
        fake.dora_norm = guard_dora_norm, fake.dora_apply = guard_dora_apply, fake.dora_bwd = guard_dora_bwd;
        fake.scale_rows = guard_scale_rows, fake.prompt_act = guard_prompt_act, fake.prompt_act_bwd = guard_prompt_act_bwd;
        fake.dequant_int8 = guard_dequant_int8, fake.dequant_nf4 = guard_dequant_nf4;
        fake.bias_add = guard_bias_add, fake.to_bf16 = guard_to_bf16, fake.from_bf16 = guard_from_bf16;
        fake.decode_mm = guard_decode_mm, fake.kv_store = guard_kv_store;
        fake.attention_cached = guard_attention_cached, fake.embedding_fwd = guard_embedding_fwd;
        fake.w8_pack = guard_w8_pack, fake.matmul_w8a8 = guard_matmul_w8a8; /* as the cuda backend: on device memory */
        fake.qmatmul = guard_qmatmul;
        guarded = 1;
    }
    fake.matmul = f_matmul, fake.matmul_bf16 = f_matmul_bf16;
    fake.attention_fwd = f_attention_fwd, fake.attention_bwd = f_attention_bwd;
    fake.cross_entropy = f_cross_entropy, fake.cross_entropy_acc = f_cross_entropy_acc;
    fake.xent_block_loss = f_xent_block_loss;
    fake.adamw_multi = f_adamw_multi;
    if (self_test) return guard_self_test();
    st_backend_set_override(&fake);
    int rc, gen = i < argc && (!strcmp(argv[i], "generate") || !strcmp(argv[i], "compare"));
    if (gen) { /* st_cmd_generate / st_cmd_compare(argc, argv): argv[0] is the command */
        rc = !strcmp(argv[i], "generate") ? st_cmd_generate(argc - i, argv + i) : st_cmd_compare(argc - i, argv + i);
        if (failure[0] && rc == 0) rc = 1; /* printed when recorded */
    } else {
        argv[i - 1] = (char *)"train"; /* st_cmd_train(argc, argv): argv[0] is the command, argv[1] the job */
        rc = st_cmd_train(argc - (i - 1), argv + (i - 1));
    }
    const char *mem = getenv("FAKEDEV_REPORT_MEM");
    long gathers, passes;
    size_t mv_recv, mv_need, mv_moved;
    st_z3dev_head_counts(&gathers, &passes);
    st_z3dev_move_counts(&mv_recv, &mv_need, &mv_moved);
    if (guard && mem && !strcmp(mem, "1")) {
        printf("fakedev device bytes: rank %d peak %zu between steps %zu; gradient reductions %ld, %ld of them "
               "beside compute; head blocks gathered %ld in %ld head passes; peak at the first status %zu, at the "
               "second %zu\n", status_rank, dev_peak, dev_between, reductions_run, reductions_overlapped, gathers, passes,
               dev_first[0], dev_first[1]);
        printf("fakedev stage-change moves: rank %d received %zu needed %zu moved %zu; point-to-point received %zu\n",
               status_rank, mv_recv, mv_need, mv_moved, p2p_recv_bytes);
    }
    return rc;
}
