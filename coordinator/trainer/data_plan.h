/* data_plan.h — the job's data plan as the trainer builds it: every task's dataset, checked against the
 * model's vocabulary, and the loader (worker/loader.h: by-document splits, mixture, packing) opened with
 * the job's split, mixing, seq_len, seed and packing. `train` and `eval --job` both go through here, so
 * the documents `eval --split` reads are exactly the ones the trainer's split holds.
 *
 * Also the step count of train.epochs: passes over the train split of all tasks at a global batch. */
#ifndef ST_DATA_PLAN_H
#define ST_DATA_PLAN_H

#include <stdint.h>

#include "coordinator/config/config.h"
#include "worker/dataset.h"
#include "worker/loader.h"

/* Loads c->tasks[k].path into datasets[k] (k < c->n_tasks; the caller frees each with st_dataset_free,
 * also on failure) and opens L over them. model_vocab > 0: a token at or above it is an error naming
 * the file and index. Errors name the task. */
int st_data_plan_open(const st_config *c, int64_t model_vocab, st_dataset *datasets, st_loader *L);

/* Train sequences of one epoch over all tasks: sum over tasks of the train windows (packing stream) or
 * of the packed sequences of epoch 0 (packing documents). */
uint64_t st_data_plan_epoch_sequences(const st_loader *L);

/* train.epochs as optimizer steps: ceil(epochs x epoch sequences / global_batch), at least 1. Fails
 * (naming train.epochs) when the count is over INT32_MAX. */
int st_data_plan_epoch_steps(const st_loader *L, double epochs, int64_t global_batch, int64_t *steps);

#endif
