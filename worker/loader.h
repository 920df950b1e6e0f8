/* loader.h — deterministic, world-size-independent training sample streams over one or more tasks.
 *
 * Exact definitions are in docs/data.md. In short:
 *  - Each task (a loaded st_dataset) is split by document into train / val / test with an RNG seeded
 *    from (seed, task index).
 *  - A training sample is a window of seq_len+1 tokens of the task's train stream: inputs = tokens
 *    [0..T-1], targets = tokens [1..T], target mask = loss_mask of the targets. Each epoch the train
 *    documents are shuffled (seed, task, epoch), concatenated and cut into windows with stride T
 *    (the last partial window is dropped).
 *  - Step s consumes global sample slots [s*G, (s+1)*G). Slot i gets its task from a draw that depends
 *    only on (seed, i) and the mixture probabilities; each task's cursor advances in slot order.
 *    A rank fills a contiguous sub-range of the global batch. So the samples of a step depend on G,
 *    never on how the global batch is divided among ranks.
 *
 * The loader borrows the datasets (they must outlive it) and owns its split and order arrays,
 * released by st_loader_free(). */
#ifndef ST_LOADER_H
#define ST_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "worker/dataset.h"
#include "worker/packing.h"
#include "worker/train_kinds.h" /* st_mixing_strategy, st_packing_mode */

enum { ST_SPLIT_TRAIN = 0, ST_SPLIT_VAL = 1, ST_SPLIT_TEST = 2 };

/* train.packing: stream = windows of the concatenated documents (cross documents); documents = whole
 * documents packed per sequence (worker/packing.h), attention and positions reset per document. */

#define ST_LOADER_MAX_TASKS 65535

typedef struct {
    const st_dataset *ds; /* borrowed */
    char name[128];
    uint64_t *docs[3];     /* document indices of each split, ascending (owned) */
    uint64_t *starts[3];   /* [n_docs+1] start of each doc in the split's concatenation, in `docs` order */
    uint64_t n_docs[3], n_tokens[3];
    uint64_t n_windows;    /* train windows per epoch: (n_tokens[TRAIN] - 1) / seq_len; documents mode: the
                            * sequences of epoch 0 (the mixture size and the resume fingerprint) */
    double prob;           /* mixture probability */
    uint64_t epoch, window; /* cursor: the next train window to hand out */
    /* The train documents in the order of epoch `order_epoch` and their prefix sums (a cache). */
    uint64_t order_epoch;
    uint64_t *order, *order_starts;
    /* documents mode: the packing of epoch `pack_epoch` (a cache) and of each split in file order (eval) */
    uint64_t pack_epoch;
    st_packing pack, split_pack[3];
} st_loader_task;

typedef struct {
    int n_tasks, seq_len;
    st_packing_mode packing;
    uint64_t seed;
    uint64_t next_slot; /* global sample slots consumed so far */
    st_loader_task *tasks;
    double *cum_prob;   /* [n_tasks], cumulative probabilities, last = 1 */
} st_loader;

/* What st_loader_open needs. datasets[k] is task k's data; names may be NULL ("task<k>");
 * weights is read only for ST_MIXING_WEIGHTS (each > 0). strategy: ST_MIXING_PROPORTIONAL (p_k ∝
 * min(n_k, cap)), ST_MIXING_TEMPERATURE (p_k ∝ min(n_k, cap)^(1/temperature)), ST_MIXING_WEIGHTS (p_k ∝
 * weight_k), where n_k = train windows of task k and cap <= 0 means no cap.
 * split = train/val/test fractions. All pointers are borrowed for the call only, except the datasets. */
typedef struct {
    int n_tasks;
    const st_dataset *const *datasets;
    const char *const *names;
    const double *weights;
    st_mixing_strategy strategy; /* 0 = ST_MIXING_PROPORTIONAL */
    double temperature;
    int64_t cap;
    double split[3];
    int seq_len;
    uint64_t seed;
    st_packing_mode packing;
} st_loader_options;

/* Builds the splits, the mixture and (documents mode) each task's packings. */
int st_loader_open(st_loader *L, const st_loader_options *o);

/* The same with positional arguments and packing stream (kept for existing callers and tests). */
int st_loader_init(st_loader *L, int n_tasks, const st_dataset *const *datasets, const char *const *names,
                   const double *user_weights, st_mixing_strategy strategy, double temperature, int64_t cap,
                   const double split[3], int seq_len, uint64_t seed);

/* Fills samples [first_slot, first_slot + n_slots) of the next global batch of `global_batch` samples
 * and advances the state past the whole global batch. inputs/targets are [n_slots * seq_len] token ids,
 * target_mask is [n_slots * seq_len] (1 = counts in the loss), task_of_sample [n_slots] (may be NULL). */
int st_loader_next(st_loader *L, int global_batch, int first_slot, int n_slots, int32_t *inputs, int32_t *targets,
                   float *target_mask, int *task_of_sample);
/* The same, also filling seg/pos [n_slots * seq_len] (each may be NULL): the document segment id of each
 * position in its sequence and its position inside the document (stream mode: 0 and 0..T-1). */
int st_loader_next_docs(st_loader *L, int global_batch, int first_slot, int n_slots, int32_t *inputs,
                        int32_t *targets, float *target_mask, int *task_of_sample, int32_t *seg, int32_t *pos);

/* Documents mode: real target positions / slots of task k's epoch-0 packing (stream: 1). */
double st_loader_packing_efficiency(const st_loader *L, int task);

/* p[k] for k < n_tasks. */
void st_loader_probabilities(const st_loader *L, double *p);

/* Resume state as a small array of uint64 words (store it as a checkpoint attribute):
 * format tag, seed, seq_len, n_tasks, next_slot, then per task epoch, window, n_windows. The tag says
 * the packing mode ("STLD1" stream, "STLD2" documents), so a state never resumes under the other mode.
 * The task draws are a pure function of (seed, slot), so seed + next_slot is the whole RNG state. */
size_t st_loader_state_words(const st_loader *L);
void st_loader_state_save(const st_loader *L, uint64_t *words);
/* Refuses a state saved with another seed, seq_len, task count, or train split size (names the task). */
int st_loader_state_restore(st_loader *L, const uint64_t *words, size_t n_words);

/* In-order windows (stride seq_len) over one task's val or test split, documents in file order
 * (documents mode: the split's own packing, documents in file order). */
typedef struct {
    const st_loader_task *task;
    int split, seq_len;
    st_packing_mode packing;
    uint64_t window, n_windows;
} st_loader_eval;

int st_loader_eval_begin(const st_loader *L, int task, int split, st_loader_eval *it);
/* Returns 1 and fills one window, or 0 when the split is exhausted. */
int st_loader_eval_next(st_loader_eval *it, int32_t *inputs, int32_t *targets, float *target_mask);
/* The same with seg/pos [seq_len] (each may be NULL), as st_loader_next_docs. */
int st_loader_eval_next_docs(st_loader_eval *it, int32_t *inputs, int32_t *targets, float *target_mask,
                             int32_t *seg, int32_t *pos);

void st_loader_free(st_loader *L);

#endif
