/* train_stage.c — stage changes of the fine-tuning schedule: the optimizer settings from the config and the
 * switch to a new trainable set (re-sharding in worker/comm.c). Used by the loop (train.c) and by resume
 * (train_ckpt.c); calls nothing else of the trainer. */
#include "coordinator/trainer/train_internal.h"

#include <stdlib.h>
#include <string.h>

static st_optim_config optim_config(const st_config *c) {
    st_optim_config o;
    o.lr = (float)c->train.lr;
    o.beta1 = (float)c->train.betas[0];
    o.beta2 = (float)c->train.betas[1];
    o.eps = (float)c->train.eps;
    o.weight_decay = (float)c->train.weight_decay;
    o.schedule = c->train.schedule;
    o.warmup_steps = (int)c->train.warmup_steps;
    o.total_steps = (int)c->train.steps;
    o.min_lr_ratio = (float)c->train.min_lr_ratio;
    o.layer_lr_decay = (float)c->finetune.layer_lr_decay;
    return o;
}

size_t st_trainer_hold_bf16(trainer *t) {
    if (t->dp.stage < 3) return st_model_drop_frozen_fp32(&t->model);
    return t->weights_read ? st_comm_drop_frozen_fp32(&t->dp, &t->model) : 0; /* collective */
}

/* Makes stage `s` current: trainable set, gradient layout, shards and optimizer state. Parameters that
 * stay trainable keep their AdamW moments and step count; new ones start fresh (worker/comm.c). */
int st_trainer_enter_stage(trainer *t, int s) {
    st_optim_config oc = optim_config(t->cfg);
    st_comm_options co = {.stage = t->cfg->sharding.stage,
                          .bucket_bytes = (size_t)(t->cfg->sharding.bucket_mb * 1048576.0),
                          .frozen_bf16 = t->z3_frozen16};
    int rc = st_comm_reshard_optim(&t->dp, &t->optim, &t->model, t->comm, &co, &oc, t->stages.stages[s].layers,
                                   t->stages.stages[s].modules);
    /* frozen weights of a bf16 source held once, in bf16 (worker/model.h; st_model_set_trainable gave the
     * newly trainable ones their fp32 masters back, exactly) */
    if (t->cfg->sharding.stage == 3) rc = st_trainer_agree(t, rc); /* the hold below is collective there */
    size_t w16 = rc ? 0 : st_trainer_hold_bf16(t);
    t->stage = s;
    if (!rc) st_trainer_report_bf16(t, w16);
    return rc;
}

void st_trainer_report_bf16(const trainer *t, size_t w16) {
    const char *report = getenv("SHARDTUNE_REPORT_LOAD_RSS"); /* tests: what the stage holds in bf16 only */
    if (report && !strcmp(report, "1"))
        fprintf(stderr, "shardtune train: rank %d: stage %d: %zu frozen weights held in bf16 only\n", t->rank, t->stage, w16);
}
