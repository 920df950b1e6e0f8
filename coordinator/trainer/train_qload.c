/* train_qload.c — QLoRA at sharding.stage 3: the base loaded sharded, on a device and on CPU ranks (issue #17).
 *
 * Below stage 3 (and with SHARDTUNE_Z3DEV_QLOAD=whole, the A/B and the tests' reference, on either backend)
 * train.c load_quantized quantizes the whole base on every rank and the communicator then keeps this rank's part
 * of the codes and of the kept base (worker/comm_zero3_dev.c qz_init, cut_shards; on CPU ranks worker/comm.c gives
 * the rest of the blob and weights back): the load held the whole model's codes and fp32 embedding / head. Here
 * the model is laid out without reading the base (on a device without a blob or a kept base, worker/qlora.h
 * spec.sharded: the adapters' floats only; on CPU ranks the blob and the compacted weights are untouched address
 * space), the communicator is built over that, and then each rank reads only what it keeps (st_comm_qlora_part:
 * a device's 4-byte words of the blob in the communicator's buffer, CPU ranks' bytes [qlo, qhi) of the blob
 * itself): for every quantized tensor those bytes (st_qlora_put_bytes reads just the blocks they depend on, with
 * ranged reads; a double-quantized tensor's scales need every block, so the rank owning any of them reads that
 * tensor whole, a piece at a time), and for the kept base (embedding, norms, head) its part of the frozen space,
 * a piece at a time (CPU ranks: read in place). The bytes are the whole path's bit for bit; a double-quantized
 * tensor's scale mean (held beside the bytes, by every rank) comes from the rank that computed it (a bitwise-OR
 * all-reduce: the others give 0). Every element is checked finite and summed into the base checksum by exactly
 * one rank (a quantized one by the owner of its code byte, a kept one by its part's owner) at its registry
 * offset: the sums add up to the whole load's number, so a resume checks the same. Then DoRA's magnitudes, from
 * the gathered bytes (st_lora_init_magnitudes_kept, as the LoRA modes' streamed load). The load holds the shard
 * plus one tensor's bytes and scales and one piece of values (host memory). */
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "coordinator/trainer/plan.h"
#include "coordinator/trainer/train_internal.h"
#include "worker/comm.h"
#include "worker/lora.h"
#include "worker/qlora.h"

st_qlora_spec st_trainer_qlora_spec(const st_config *c, const st_model *m) {
    return (st_qlora_spec){.quant = (st_qlora_quant)c->finetune.qlora.quant,
                           .double_quant = c->finetune.qlora.double_quant, .block = c->finetune.qlora.block,
                           /* bf16-only frozen parts: not with ZeRO-3's frozen space, which gathers fp32 */
                           .bf16 = c->precision == ST_PRECISION_BF16 && c->sharding.stage < 3,
                           .mlp_apart = st_plan_qlora_mlp_apart(c, &m->cfg)};
}

int st_trainer_qload_layout(trainer *t) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    int rc = st_model_open_registry(c->model.path, m);
    if (!rc) rc = st_plan_attach_adapters(c, m); /* the adapters' registry entries (no backend yet) */
    int dev = !t->be->host_memory;
    m->buffers_external = dev; /* a device: no whole gradient buffer or bf16 copy: the communicator's windows */
    if (!rc) rc = st_model_bind(m, t->be, 0);
    st_qlora_spec qs = st_trainer_qlora_spec(c, m);
    /* a device: no blob, the adapters' floats only; CPU ranks: the blob and the compacted buffer as address
     * space (st_calloc_aligned), their pages resident only where this rank writes its parts (worker/comm.c keeps
     * its parts of both in place) */
    qs.sharded = dev;
    if (!rc) rc = st_qlora_begin(m, &qs);
    st_safetensors *s = NULL;
    if (!rc) rc = st_model_check_files(m, c->model.path, &s); /* a missing tensor or shape: before any collective */
    if (s) st_safetensors_close(s);
    if (!rc) rc = st_lora_init_adapters(m);
    return rc;
}

/* One quantized tensor's reader (st_qlora_read_fn): ranged reads (a transposed Conv1D tensor read whole once),
 * each piece checked finite, the elements this rank owns [o0, o1) summed at registry offset `at`. */
typedef struct {
    st_safetensors *s;
    const st_model *m;
    const char *dir;
    size_t at, o0, o1;
    float *whole;
    uint64_t sum;
} qreader;

static int read_values(qreader *r, int i, size_t a, size_t n, float *dst) {
    const st_param *p = &r->m->params[i];
    if (!(p->ndim == 2 && p->transpose_io)) return st_model_read_param_range(r->s, r->m, i, a, n, dst);
    if (!r->whole) {
        r->whole = malloc(p->numel * sizeof(float) + sizeof(float));
        if (!r->whole) return st_fail(ST_ENOMEM, "out of memory loading %s", p->name);
        int rc = st_model_read_param(r->s, r->m, i, r->whole);
        if (rc) return rc;
    }
    memcpy(dst, r->whole + a, n * sizeof(float));
    return 0;
}

static int read_piece(void *ctx, int i, size_t a, size_t n, float *dst) {
    qreader *r = ctx;
    int rc = read_values(r, i, a, n, dst);
    if (!rc) rc = st_check_finite_values(dst, n, a, r->dir, r->m->params[i].name);
    size_t s0 = a > r->o0 ? a : r->o0, s1 = a + n < r->o1 ? a + n : r->o1;
    if (!rc && s0 < s1) r->sum += st_ckpt_checksum(dst + (s0 - a), r->at + s0, s1 - s0);
    return rc;
}

/* Kept (unquantized) base parameter i: this rank's part [a, b) read, checked and put a piece at a time (CPU ranks:
 * read in place, buf NULL). */
static int read_kept(trainer *t, qreader *r, int i, size_t a, size_t b, float *buf, size_t chunk, int count) {
    st_model *m = &t->model;
    r->o0 = count ? a : 0;
    r->o1 = count ? b : 0;
    int rc = 0;
    for (size_t x = a; !rc && x < b; x += chunk) {
        size_t n = b - x < chunk ? b - x : chunk;
        rc = read_piece(r, i, x, n, buf ? buf : st_model_part(m, i) + x);
        if (!rc && buf) m->be->copy_to_device(st_model_part(m, i) + x, buf, n * sizeof(float));
    }
    return rc;
}

/* This rank's words of the blob and parts of the kept base (not collective); means[k]: the bits of quantized
 * parameter k's scale mean where this rank computed it, else 0. */
static int read_parts(trainer *t, uint32_t *means, uint64_t *sum) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    const size_t chunk = (size_t)1 << 20;
    size_t qa, qb;
    uint8_t *dst = st_comm_qlora_part(&t->dp, &qa, &qb);
    float *buf = m->be->host_memory ? NULL : malloc(chunk * sizeof(float)); /* a device's staging */
    qreader r = {.m = m, .dir = c->model.path};
    int rc = buf || m->be->host_memory ? st_model_check_files(m, c->model.path, &r.s)
                                       : st_fail(ST_ENOMEM, "out of memory loading %s", c->model.path);
    size_t at = 0; /* the registry offset (the layout moved the parameters): base parameters back to back */
    for (int i = 0; !rc && i < st_model_base_params(m); at += m->params[i].numel, i++) {
        r.at = at;
        r.sum = 0;
        if (st_qlora_holds(m, i)) {
            int set = 0;
            st_qlora_code_elems(m, i, qa, qb, &r.o0, &r.o1);
            rc = st_qlora_put_bytes(m, i, qa, qb, read_piece, &r, dst, &set);
            float mean = st_qlora_mean(m, i);
            if (set) memcpy(&means[i], &mean, sizeof mean);
        } else {
            size_t a, b;
            st_comm_param_keep(&t->dp, m, i, &a, &b); /* a part kept whole on every rank counts on rank 0 only */
            rc = read_kept(t, &r, i, a, b, buf, chunk, st_comm_param_sharded(&t->dp, m, i) || t->rank == 0);
        }
        free(r.whole);
        r.whole = NULL;
        *sum += r.sum;
    }
    if (r.s) st_safetensors_close(r.s);
    free(buf);
    st_model_weights_changed(m);
    return rc;
}

int st_trainer_qload_read(trainer *t) {
    st_model *m = &t->model;
    int nb = st_model_base_params(m);
    uint32_t *means = calloc((size_t)nb + 1, sizeof *means);
    uint64_t sum = 0;
    int rc = st_trainer_agree(t, means ? read_parts(t, means, &sum) : st_fail(ST_ENOMEM, "out of memory"));
    if (!rc && (MPI_Allreduce(MPI_IN_PLACE, means, nb, MPI_UINT32_T, MPI_BOR, t->comm) != MPI_SUCCESS ||
                MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_UINT64_T, MPI_SUM, t->comm) != MPI_SUCCESS))
        rc = st_fail(ST_ECOMM, "rank %d: the sharded QLoRA load's all-reduce failed", t->rank);
    for (int i = 0; !rc && i < nb; i++) {
        float mean;
        memcpy(&mean, &means[i], sizeof mean);
        if (st_qlora_holds(m, i)) st_qlora_set_mean(m, i, mean); /* (0 without double quantization: unused) */
    }
    free(means);
    t->base_checksum = sum ? sum : 1;
    if (!rc && t->cfg->finetune.lora.dora) /* from the gathered bytes, each rank its parts of the magnitudes */
        rc = st_trainer_agree(t, st_lora_init_magnitudes_kept(m, st_trainer_keep_part, &t->dp));
    return rc;
}
