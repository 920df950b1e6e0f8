/* data_plan.c — the job's datasets and loader as training opens them (data_plan.h), and train.epochs
 * in steps. */
#include "coordinator/trainer/data_plan.h"

#include <math.h>

#include "common/error.h"

static int load_task(const st_task_config *task, int64_t model_vocab, st_dataset *d) {
    int rc = st_dataset_load(task->path, d);
    if (rc) return st_fail_context(rc, "task '%s'", task->name);
    if (st_dataset_masked_tokens(d) >= d->n_tokens)
        return st_fail(ST_EINVAL, "task '%s': every token of %s is masked (loss_mask all 0): nothing to train on",
                       task->name, task->path);
    if (model_vocab > 0 && d->vocab_size > model_vocab) {
        for (uint64_t i = 0; i < d->n_tokens; i++)
            if ((int64_t)d->tokens[i] >= model_vocab)
                return st_fail(ST_EINVAL, "%s: token %u at index %llu is outside the model's vocabulary (%lld)",
                               task->path, d->tokens[i], (unsigned long long)i, (long long)model_vocab);
    }
    return 0;
}

int st_data_plan_open(const st_config *c, int64_t model_vocab, st_dataset *datasets, st_loader *L) {
    const st_dataset *ptrs[ST_CFG_MAX_TASKS];
    const char *names[ST_CFG_MAX_TASKS];
    double weights[ST_CFG_MAX_TASKS];
    for (int k = 0; k < c->n_tasks; k++) {
        int rc = load_task(&c->tasks[k], model_vocab, &datasets[k]);
        if (rc) return rc;
        ptrs[k] = &datasets[k];
        names[k] = c->tasks[k].name;
        weights[k] = c->tasks[k].weight;
    }
    st_loader_options lo = {c->n_tasks, ptrs, names, weights, c->mixing.strategy,
                            c->mixing.temperature, c->mixing.cap, {c->split[0], c->split[1], c->split[2]},
                            c->train.seq_len, (uint64_t)c->seed, c->train.packing};
    return st_loader_open(L, &lo);
}

uint64_t st_data_plan_epoch_sequences(const st_loader *L) {
    uint64_t n = 0;
    for (int k = 0; k < L->n_tasks; k++) n += L->tasks[k].n_windows;
    return n;
}

int st_data_plan_epoch_steps(const st_loader *L, double epochs, int64_t global_batch, int64_t *steps) {
    double seqs = (double)st_data_plan_epoch_sequences(L);
    double s = ceil(epochs * seqs / (double)global_batch - 1e-9); /* 2 x 10 / 4 is 5 steps, not 6 */
    if (s < 1) s = 1;
    if (!(s <= (double)INT32_MAX))
        return st_fail(ST_ECONFIG, "train.epochs %g is %.0f steps at a global batch of %lld sequences, over the "
                                   "limit of %d", epochs, s, (long long)global_batch, INT32_MAX);
    *steps = (int64_t)s;
    return 0;
}
