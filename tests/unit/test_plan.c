/* test_plan.c — the planner (coordinator/trainer/plan.h) against the allocations it predicts.
 *
 * For every stage the plan's padded space, shard ranges, gradient offsets and byte counts are compared
 * with what st_model_set_trainable, st_model_alloc_activations and st_comm_init / st_optim_init really
 * do on a model built on the CPU backend (MPI singleton for the world-1 communicator; for larger worlds
 * the shard arithmetic is re-derived here). The stage schedule is checked against hand-written
 * expectations; bad schedules must fail with a message naming the key. Device stage 2's gradient bytes
 * (worker/comm_zero2_dev.c; integration.test_zero2_device measures them on fakedev) are re-derived from the
 * registry for every mode, model and world. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "coordinator/config/config.h"
#include "coordinator/trainer/plan.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/optim.h"

static st_model_config llama_cfg(int layers, int tied) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.n_layer = layers;
    c.d_model = 32;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.head_dim = 8;
    c.d_ff = 48;
    c.vocab = 50;
    c.max_seq = 32;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tied_embeddings = tied;
    c.bos_id = c.eos_id = -1;
    return c;
}

static st_model_config gpt2_cfg(int layers) {
    st_model_config c = llama_cfg(layers, 1);
    c.family = ST_FAMILY_GPT2;
    snprintf(c.model_type, sizeof c.model_type, "gpt2");
    c.n_kv_head = 4;
    c.d_ff = 128;
    c.qkv_bias = 1;
    return c;
}

static void load_cfg(st_config *c, const char *extra, const char *override) {
    char yaml[2048];
    snprintf(yaml, sizeof yaml,
             "model: {path: m}\ntasks:\n  - {name: a, path: a.h5}\n  - {name: b, path: b.h5}\n"
             "train: {micro_batch: 3, grad_accum: 2, seq_len: 16}\n%s",
             extra);
    char *ov[1] = {(char *)override};
    int rc = st_config_load_string(c, yaml, override ? 1 : 0, ov);
    if (rc) fail_msg("config: %s", st_error());
}

/* Compares a plan with a real model's allocations, stage by stage. */
static void check_plan_against_model(const st_config *c, const st_model_config *mc, int world) {
    st_model m;
    assert_int_equal(st_model_build(&m, mc, st_backend_cpu(1)), 0);
    st_plan p;
    if (st_plan_build(c, &m, world, &p)) fail_msg("plan: %s", st_error());
    st_stage_list sl;
    assert_int_equal(st_plan_stages(c, &m, &sl), 0);
    assert_int_equal(sl.n, p.n_stages);
    assert_int_equal(st_model_alloc_activations(&m, c->train.micro_batch, c->train.seq_len), 0);
    size_t rope = mc->family == ST_FAMILY_LLAMA ? (size_t)c->train.seq_len * mc->head_dim : 0;
    size_t acts = (m.act_floats + (size_t)c->train.micro_batch * c->train.seq_len + rope) * sizeof(float);
    long *goff = malloc((size_t)m.n_params * sizeof(long));
    size_t prev_pad = 0;
    for (int s = 0; s < p.n_stages; s++) {
        const st_stage_plan *sp = &p.stages[s];
        m.grad_align = world;
        assert_int_equal(st_model_set_trainable(&m, sl.stages[s].layers, sl.stages[s].modules), 0);
        assert_int_equal(sp->n_trainable, m.n_grads);
        assert_int_equal(sp->n_pad, m.grad_alloc);
        assert_int_equal(sp->n_pad % (size_t)world, 0);
        assert_true(sp->n_pad - sp->n_trainable < (size_t)world);
        assert_int_equal(sp->shard * (size_t)world, sp->n_pad);
        assert_int_equal(sp->transition_extra, 2 * prev_pad * sizeof(float));
        prev_pad = sp->n_pad;
        assert_int_equal(st_model_grad_offsets(&m, sl.stages[s].layers, sl.stages[s].modules, goff), m.n_grads);
        int trainable = 0;
        for (int i = 0; i < m.n_params; i++) {
            assert_int_equal(goff[i], m.params[i].grad_offset);
            trainable += m.params[i].grad_offset >= 0;
        }
        assert_int_equal(sp->n_trainable_params, trainable);
        /* parameter staging: stage 1 the whole compact space; stage 2 none when every parameter trains
         * (in place into the weights), else one bucket; none on one rank */
        int in_place = m.n_grads == m.n_weights;
        size_t bucket_f = (size_t)(c->sharding.bucket_mb * 1048576.0) / sizeof(float);
        size_t staging = in_place ? 0 : bucket_f < m.grad_alloc ? bucket_f : m.grad_alloc;
        size_t covered = 0;
        for (int r = 0; r < world; r++) {
            const st_rank_plan *rp = &sp->ranks[r];
            assert_int_equal(rp->lo, covered);
            covered = rp->hi;
            /* parameters touching [lo, hi), counted independently */
            int n = 0, first = -1, last = -1;
            for (int i = 0; i < m.n_params; i++) {
                const st_param *q = &m.params[i];
                if (q->grad_offset < 0) continue;
                size_t a = (size_t)q->grad_offset;
                if (a < rp->hi && a + q->numel > rp->lo) { n++; if (first < 0) first = i; last = i; }
            }
            assert_int_equal(rp->n_params, n);
            assert_int_equal(rp->first_param, first);
            assert_int_equal(rp->last_param, last);
            size_t range = c->sharding.stage == 0 ? m.grad_alloc : m.grad_alloc / (size_t)world;
            assert_int_equal(rp->weights, m.n_weights * sizeof(float));
            size_t largest = 0;
            for (int i = 0; i < m.n_params; i++)
                if (m.params[i].grad_offset >= 0 && m.params[i].numel > largest) largest = m.params[i].numel;
            if (c->sharding.stage == 2 && world > 1) {
                /* ZeRO-2 on CPU ranks: the shard plus the gradients resident at once (at least the largest
                 * trainable tensor, less than the full buffer when more than one group trains), no full
                 * gradient; receive buffers of later micro-batches (grad_accum 2): one shard per piece in flight */
                assert_true(rp->grads >= (range + largest) * sizeof(float));
                assert_true(rp->grads <= (range + m.grad_alloc + ST_S2_INFLIGHT * range) * sizeof(float));
            } else {
                assert_int_equal(rp->grads, (m.grad_alloc + (c->sharding.stage == 2 ? range : 0)) * sizeof(float));
            }
            assert_int_equal(rp->optim, 2 * range * sizeof(float) + ((size_t)m.n_params + 1) * sizeof(int));
            /* one rank updates in place: no staging (comm.c st_comm_init) */
            size_t want_comm = world == 1 ? 0 : c->sharding.stage == 1 ? m.grad_alloc : c->sharding.stage == 2 ? staging : 0;
            assert_int_equal(rp->comm, want_comm * sizeof(float));
            assert_int_equal(rp->activations, acts);
            assert_int_equal(rp->total, rp->weights + rp->grads + rp->optim + rp->comm + rp->activations +
                                            rp->buffers);
        }
        assert_int_equal(covered, sp->n_pad);
        if (world == 1) { /* the real communicator and optimizer on one rank */
            st_comm comm;
            st_optim o;
            st_optim_config oc = {0};
            st_comm_options co = {.stage = c->sharding.stage, .bucket_bytes = (size_t)(c->sharding.bucket_mb * 1048576.0)};
            assert_int_equal(st_comm_init(&comm, MPI_COMM_SELF, &co, &m), 0);
            size_t lo, hi;
            st_comm_optim_range(&comm, &lo, &hi);
            assert_int_equal(st_optim_init(&o, &oc, lo, hi, &m, m.be), 0);
            size_t have = (comm.flat_params ? c->sharding.stage == 2 ? staging : comm.n_pad : 0) * sizeof(float);
            assert_int_equal(sp->ranks[0].comm, have);
            size_t sg = (comm.shard_grads ? comm.shard : 0) * sizeof(float);
            assert_int_equal(sp->ranks[0].grads, m.grad_alloc * sizeof(float) + sg);
            assert_int_equal(sp->ranks[0].optim, 2 * (hi - lo) * sizeof(float) + ((size_t)m.n_params + 1) * sizeof(int));
            st_optim_free(&o, m.be);
            free(o.param_step);
            st_comm_free(&comm);
        }
    }
    free(goff);
    st_stage_list_free(&sl);
    st_plan_free(&p);
    st_model_free(&m);
}

static void test_plan_matches_allocations(void **state) {
    (void)state;
    static st_config c;
    st_model_config ll = llama_cfg(3, 0), lt = llama_cfg(3, 1), g = gpt2_cfg(2);
    const char *modes[] = {
        "finetune: {mode: full}\n",
        "finetune: {mode: frozen, train_layers: \"-1\", train_modules: [attn, norm]}\n",
        "finetune: {mode: frozen, train_layers: \"0\", train_modules: [embed, mlp]}\n",
        "finetune: {mode: progressive, stages: [{at_step: 0, train_layers: \"-1\"}, {at_step: 3, train_layers: "
        "\"-2\"}, {at_step: 6, train_layers: all}]}\n",
        "finetune: {mode: progressive, unfreeze_every: 2}\n",
    };
    const char *stages[] = {"sharding.stage=0", "sharding.stage=1", "sharding.stage=2"};
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++)
        for (int z = 0; z < 3; z++)
            for (int w = 1; w <= 5; w += 2) {
                load_cfg(&c, modes[i], stages[z]);
                check_plan_against_model(&c, &ll, w);
                check_plan_against_model(&c, &lt, w);
                check_plan_against_model(&c, &g, w);
            }
}

/* Device stage 2 (worker/comm_zero2_dev.c): each rank's gradient bytes are its shard, final norm + head's
 * trainable floats, tied embeddings' (untied ones share a bucket when they fit) and the largest layer's
 * twice (two buckets: one's in-place reduction in flight while backward writes the other; one bucket on one
 * rank), derived here from the registry's parameter kinds and layers; with SHARDTUNE_ZERO2_FULL_GRADS=1 the
 * full buffer plus the shard. */
static void check_device_zero2(const st_config *c, const st_model_config *mc, int world, int expect_less) {
    st_model m;
    assert_int_equal(st_model_build(&m, mc, st_backend_cpu(1)), 0);
    st_stage_list sl;
    assert_int_equal(st_plan_stages(c, &m, &sl), 0);
    st_plan p, full;
    if (st_plan_build(c, &m, world, &p)) fail_msg("plan: %s", st_error());
    setenv("SHARDTUNE_ZERO2_FULL_GRADS", "1", 1);
    if (st_plan_build(c, &m, world, &full)) fail_msg("plan: %s", st_error());
    unsetenv("SHARDTUNE_ZERO2_FULL_GRADS");
    for (int s = 0; s < p.n_stages; s++) {
        m.grad_align = world;
        assert_int_equal(st_model_set_trainable(&m, sl.stages[s].layers, sl.stages[s].modules), 0);
        size_t embed = 0, head = 0, layer[64] = {0}, biggest = 0;
        for (int i = 0; i < m.n_params; i++) {
            const st_param *q = &m.params[i];
            if (q->grad_offset < 0) continue;
            if (q->layer >= 0) layer[q->layer] += q->numel;
            else if (q->kind == ST_MOD_EMBED) embed += q->numel;
            else head += q->numel; /* final norm, untied head */
        }
        for (int l = 0; l < mc->n_layer; l++) biggest = layer[l] > biggest ? layer[l] : biggest;
        size_t shard = m.grad_alloc / (size_t)world, buckets = world > 1 ? 2 : 1;
        int shares = !mc->tied_embeddings && embed && embed <= biggest;
        size_t want = m.n_grads ? shard + head + (shares ? 0 : embed) + buckets * biggest : 0;
        for (int r = 0; r < world; r++) {
            assert_int_equal(p.stages[s].ranks[r].grads, want * sizeof(float));
            assert_int_equal(full.stages[s].ranks[r].grads, m.n_grads ? (m.grad_alloc + shard) * sizeof(float) : 0);
            if (expect_less) /* every layer trains, several ranks: less than with the full buffer */
                assert_true(p.stages[s].ranks[r].total < full.stages[s].ranks[r].total);
        }
    }
    st_stage_list_free(&sl);
    st_plan_free(&p);
    st_plan_free(&full);
    st_model_free(&m);
}

static void test_plan_device_zero2(void **state) {
    (void)state;
    static st_config c;
    st_model_config ll = llama_cfg(3, 0), lt = llama_cfg(3, 1), g = gpt2_cfg(2);
    const char *modes[] = {
        "backend: cuda\nfinetune: {mode: full}\n",
        "backend: cuda\nfinetune: {mode: frozen, train_layers: \"-1\", train_modules: [attn, norm]}\n",
        "backend: cuda\nfinetune: {mode: frozen, train_layers: \"0\", train_modules: [embed, mlp]}\n",
        "backend: cuda\nfinetune: {mode: progressive, unfreeze_every: 2}\n",
    };
    for (size_t i = 0; i < sizeof modes / sizeof *modes; i++)
        for (int w = 1; w <= 5; w += 2) {
            load_cfg(&c, modes[i], "sharding.stage=2");
            int less = i == 0 && w > 1;
            check_device_zero2(&c, &ll, w, less);
            check_device_zero2(&c, &lt, w, less);
            check_device_zero2(&c, &g, w, less);
        }
}

/* A progressive stage change at ZeRO-3: on CPU ranks the old moments' shards and this rank's old weight parts
 * (worker/comm.c reshard_moments / reshard_weights move them to their new owners); on a device the old
 * moments gathered and the weights whole. */
static void test_plan_zero3_transition(void **state) {
    (void)state;
    static st_config c;
    st_model_config mc = llama_cfg(3, 0);
    st_model m;
    assert_int_equal(st_model_build_registry(&m, &mc), 0);
    const char *modes[] = {"finetune: {mode: progressive, unfreeze_every: 2}\n",
                           "backend: cuda\nfinetune: {mode: progressive, unfreeze_every: 2}\n"};
    /* the old shards moved (CPU ranks and a device alike), or whole everywhere under SHARDTUNE_ZERO3_RESHARD=whole */
    for (int whole = 0; whole < 2; whole++)
        for (int dev = 0; dev < 2; dev++)
            for (int w = 1; w <= 4; w++) {
                if (whole) setenv("SHARDTUNE_ZERO3_RESHARD", "whole", 1);
                load_cfg(&c, modes[dev], "sharding.stage=3");
                st_plan p;
                if (st_plan_build(&c, &m, w, &p)) fail_msg("plan: %s", st_error());
                unsetenv("SHARDTUNE_ZERO3_RESHARD");
                assert_true(p.n_stages > 1);
                assert_int_equal(p.stages[0].transition_extra, 0);
                for (int s = 1; s < p.n_stages; s++) {
                    size_t prev = p.stages[s - 1].n_pad, old = whole ? prev : prev / (size_t)w;
                    size_t weights = whole ? m.n_weights : (m.n_weights + (size_t)w - 1) / (size_t)w + 1;
                    assert_int_equal(prev % (size_t)w, 0);
                    assert_int_equal(p.stages[s].transition_extra, (2 * old + weights) * sizeof(float));
                }
                st_plan_free(&p);
            }
    st_model_free(&m);
}

/* progressive at ZeRO-3 reads only the first stage's parts (st_plan_streams, train.c load_streamed): its load
 * phase is `frozen`'s with the same trainable set on every rank (a whole load would hold the whole weights),
 * on CPU ranks and a device. */
static void test_plan_zero3_progressive_streams(void **state) {
    (void)state;
    static st_config c;
    st_model_config mc = llama_cfg(3, 0);
    st_model m;
    assert_int_equal(st_model_build_registry(&m, &mc), 0);
    const char *prog = "finetune: {mode: progressive, stages: [{at_step: 0, train_layers: \"-1\"}, "
                       "{at_step: 3, train_layers: \"-2\"}]}\n";
    const char *frozen = "finetune: {mode: frozen, train_layers: \"-1\"}\n";
    for (int dev = 0; dev < 2; dev++)
        for (int w = 1; w <= 4; w++) {
            char text[2][256];
            snprintf(text[0], sizeof text[0], "%s%s", dev ? "backend: cuda\n" : "", prog);
            snprintf(text[1], sizeof text[1], "%s%s", dev ? "backend: cuda\n" : "", frozen);
            st_plan p[2];
            for (int k = 0; k < 2; k++) {
                load_cfg(&c, text[k], "sharding.stage=3");
                assert_true(st_plan_streams(&c));
                if (st_plan_build(&c, &m, w, &p[k])) fail_msg("plan: %s", st_error());
            }
            for (int r = 0; r < w; r++)
                assert_int_equal(p[0].stages[0].ranks[r].at_load, p[1].stages[0].ranks[r].at_load);
            st_plan_free(&p[0]);
            st_plan_free(&p[1]);
        }
    st_model_free(&m);
}

/* QLoRA at ZeRO-3 on CPU ranks loads sharded (train_qload.c: each rank quantizes only its bytes of the codes and
 * reads its parts of the kept base): on a model whose fp32 embedding and head outweigh the rest, from 2 ranks on the
 * load phase is below the whole load's (SHARDTUNE_Z3DEV_QLOAD=whole, and SHARDTUNE_ZERO3_SHARD_FROZEN=0's, which
 * takes it) on every rank, falls as ranks are added and holds at least this rank's parts of the blob and kept base. */
static void test_plan_zero3_qload_cpu(void **state) {
    (void)state;
    static st_config c;
    st_model_config mc = llama_cfg(2, 0);
    mc.d_model = 128, mc.n_head = 4, mc.n_kv_head = 2, mc.head_dim = 32, mc.d_ff = 256, mc.vocab = 8000;
    st_model m;
    assert_int_equal(st_model_build_registry(&m, &mc), 0);
    const char *q = "finetune: {mode: qlora, lora: {targets: [q_proj, v_proj, down_proj]}}\n";
    load_cfg(&c, q, "sharding.stage=3");
    if (st_plan_attach_adapters(&c, &m)) fail_msg("adapters: %s", st_error());
    size_t kept = 2 * (size_t)mc.vocab * (size_t)mc.d_model; /* embedding + untied head, fp32 */
    size_t prev = 0;
    for (int w = 1; w <= 4; w++) {
        st_plan p[3];
        for (int k = 0; k < 3; k++) {
            if (k == 1) setenv("SHARDTUNE_Z3DEV_QLOAD", "whole", 1);
            if (k == 2) setenv("SHARDTUNE_ZERO3_SHARD_FROZEN", "0", 1);
            load_cfg(&c, q, "sharding.stage=3");
            assert_int_equal(st_plan_qload_sharded(&c, 0), k == 0);
            assert_true(st_plan_qload_sharded(&c, 1) == (k != 1)); /* a device: only the A/B switch */
            if (st_plan_build(&c, &m, w, &p[k])) fail_msg("plan: %s", st_error());
            unsetenv("SHARDTUNE_Z3DEV_QLOAD");
            unsetenv("SHARDTUNE_ZERO3_SHARD_FROZEN");
        }
        for (int r = 0; r < w; r++) {
            size_t sh = p[0].stages[0].ranks[r].at_load, wh = p[1].stages[0].ranks[r].at_load;
            assert_true(sh >= kept / (size_t)w * sizeof(float));
            if (w > 1) assert_true(sh < wh);
            if (w > 1) assert_true(sh < p[2].stages[0].ranks[r].at_load);
        }
        size_t now = p[0].stages[0].ranks[0].at_load;
        if (w > 1) assert_true(now < prev);
        prev = now;
        for (int k = 0; k < 3; k++) st_plan_free(&p[k]);
    }
    st_model_free(&m);
}

static void test_registry_only(void **state) {
    (void)state;
    st_model_config mc = llama_cfg(2, 0);
    st_model a, b;
    assert_int_equal(st_model_build(&a, &mc, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_build_registry(&b, &mc), 0);
    assert_null(b.weights);
    assert_int_equal(a.n_params, b.n_params);
    assert_int_equal(a.n_weights, b.n_weights);
    for (int i = 0; i < a.n_params; i++) {
        assert_string_equal(a.params[i].name, b.params[i].name);
        assert_int_equal(a.params[i].offset, b.params[i].offset);
    }
    st_model_free(&a);
    st_model_free(&b);
}

static void test_unfreeze_every_schedule(void **state) {
    (void)state;
    static st_config c;
    load_cfg(&c, "finetune: {mode: progressive, unfreeze_every: 5, train_modules: [attn, mlp, norm, embed, head]}\n",
             NULL);
    st_model_config mc = llama_cfg(3, 0);
    st_model m;
    assert_int_equal(st_model_build_registry(&m, &mc), 0);
    st_stage_list l;
    assert_int_equal(st_plan_stages(&c, &m, &l), 0);
    assert_int_equal(l.n, 4);
    static const unsigned char want[4][3] = {{0, 0, 0}, {0, 0, 1}, {0, 1, 1}, {1, 1, 1}};
    for (int s = 0; s < 4; s++) {
        assert_int_equal(l.stages[s].at_step, 5 * s);
        assert_memory_equal(l.stages[s].layers, want[s], 3);
    }
    assert_int_equal(st_stage_at(&l, 0), 0);
    assert_int_equal(st_stage_at(&l, 4), 0);
    assert_int_equal(st_stage_at(&l, 5), 1);
    assert_int_equal(st_stage_at(&l, 14), 2);
    assert_int_equal(st_stage_at(&l, 1000), 3);
    /* stage 0 (head only): final norm + lm_head, nothing else */
    long *goff = malloc((size_t)m.n_params * sizeof(long));
    size_t n = st_model_grad_offsets(&m, l.stages[0].layers, l.stages[0].modules, goff);
    assert_int_equal(n, (size_t)mc.d_model + (size_t)mc.vocab * mc.d_model);
    for (int i = 0; i < m.n_params; i++)
        assert_int_equal(goff[i] >= 0, !strcmp(m.params[i].name, "model.norm.weight") ||
                                           !strcmp(m.params[i].name, "lm_head.weight"));
    free(goff);
    st_stage_list_free(&l);
    st_model_free(&m);
}

static void expect_plan_error(const char *extra, const char *override, const char *needle) {
    static st_config c;
    load_cfg(&c, extra, override);
    st_model_config mc = llama_cfg(2, 0);
    st_model m;
    assert_int_equal(st_model_build_registry(&m, &mc), 0);
    st_plan p;
    int rc = st_plan_build(&c, &m, 2, &p);
    st_model_free(&m);
    if (rc == 0) fail_msg("no error for '%s' %s", extra, override ? override : "");
    if (!strstr(st_error(), needle)) fail_msg("error '%s' lacks '%s'", st_error(), needle);
    assert_null(p.stages);
}

static void test_plan_errors(void **state) {
    (void)state;
    expect_plan_error("finetune: {mode: frozen, train_layers: \"0-99\"}\n", NULL, "finetune.train_layers");
    expect_plan_error("finetune: {mode: frozen, train_layers: none, train_modules: [attn]}\n", NULL,
                      "nothing to train");
    expect_plan_error("finetune: {mode: frozen, train_layers: \"1\", train_modules: [embed]}\n", NULL,
                      "nothing to train");
    expect_plan_error("finetune: {mode: progressive, stages: [{at_step: 0, train_layers: \"-1\"}, {at_step: 4, "
                      "train_layers: \"0-5\"}]}\n",
                      NULL, "finetune.stages.1");
    expect_plan_error("", "train.seq_len=33", "max positions 32");
}

int main(void) {
    MPI_Init(NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_matches_allocations),
        cmocka_unit_test(test_plan_device_zero2),
        cmocka_unit_test(test_plan_zero3_transition),
        cmocka_unit_test(test_plan_zero3_progressive_streams),
        cmocka_unit_test(test_plan_zero3_qload_cpu),
        cmocka_unit_test(test_registry_only),
        cmocka_unit_test(test_unfreeze_every_schedule),
        cmocka_unit_test(test_plan_errors),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
