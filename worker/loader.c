/* loader.c — task splits, epoch orders, mixture draws and window extraction (see loader.h and
 * docs/data.md for the exact definitions, which tests check independently). */
#include "worker/loader.h"
#include "common/error.h"
#include "common/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* RNG streams: one purpose per top byte, so no two uses ever share a sequence. */
#define STREAM_SPLIT(task) ((1ULL << 56) | (uint64_t)(task))
#define STREAM_EPOCH(task, epoch) ((2ULL << 56) | ((uint64_t)(task) << 40) | ((epoch) & 0xffffffffffULL))
#define STREAM_SLOT(slot) ((3ULL << 56) | ((slot) & 0xffffffffffffffULL))

#define STATE_TAG 0x53544c4431ULL      /* "STLD1": stream */
#define STATE_TAG_DOCS 0x53544c4432ULL /* "STLD2": documents */
#define NO_EPOCH UINT64_MAX

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t doc_len(const st_dataset *ds, uint64_t d) { return ds->doc_offsets[d + 1] - ds->doc_offsets[d]; }

/* starts[i] = tokens of docs[0..i) (n+1 entries). */
static void prefix_sums(const st_dataset *ds, const uint64_t *docs, uint64_t n, uint64_t *starts) {
    starts[0] = 0;
    for (uint64_t i = 0; i < n; i++) starts[i + 1] = starts[i] + doc_len(ds, docs[i]);
}

/* Copies the window of T+1 tokens starting at `pos` of the concatenation of `docs`. */
static void gather_window(const st_dataset *ds, const uint64_t *docs, const uint64_t *starts, uint64_t n_docs,
                          uint64_t pos, int T, int32_t *inputs, int32_t *targets, float *mask) {
    uint64_t lo = 0, hi = n_docs; /* last d with starts[d] <= pos */
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (starts[mid] <= pos) lo = mid;
        else hi = mid;
    }
    uint64_t d = lo;
    for (int j = 0; j <= T; j++) {
        uint64_t p = pos + (uint64_t)j;
        while (p >= starts[d + 1]) d++; /* also skips empty documents */
        uint64_t src = ds->doc_offsets[docs[d]] + (p - starts[d]);
        if (j < T) inputs[j] = (int32_t)ds->tokens[src];
        if (j > 0) {
            targets[j - 1] = (int32_t)ds->tokens[src];
            mask[j - 1] = (float)ds->loss_mask[src];
        }
    }
}

/* ---------------------------------------------------------------- setup */

static int make_splits(st_loader_task *t, int k, const double split[3], uint64_t seed) {
    const st_dataset *ds = t->ds;
    uint64_t D = ds->n_docs;
    uint64_t *perm = malloc(D * sizeof *perm);
    if (!perm) return st_fail(ST_ENOMEM, "task '%s': out of memory", t->name);
    for (uint64_t i = 0; i < D; i++) perm[i] = i;
    st_rng rng;
    st_rng_seed(&rng, seed, STREAM_SPLIT(k));
    st_rng_shuffle_u64(&rng, perm, D);
    uint64_t n_train = (uint64_t)llround(split[0] * (double)D);
    if (n_train < 1) n_train = 1; /* training needs at least one document */
    if (n_train > D) n_train = D;
    uint64_t n_val = (uint64_t)llround(split[1] * (double)D);
    if (n_val > D - n_train) n_val = D - n_train;
    uint64_t counts[3] = {n_train, n_val, D - n_train - n_val}, first = 0;
    for (int s = 0; s < 3; s++) {
        t->n_docs[s] = counts[s];
        t->docs[s] = malloc((counts[s] + 1) * sizeof(uint64_t));
        t->starts[s] = malloc((counts[s] + 1) * sizeof(uint64_t));
        if (!t->docs[s] || !t->starts[s]) { free(perm); return st_fail(ST_ENOMEM, "task '%s': out of memory", t->name); }
        memcpy(t->docs[s], perm + first, counts[s] * sizeof(uint64_t));
        qsort(t->docs[s], counts[s], sizeof(uint64_t), cmp_u64); /* file order inside a split */
        prefix_sums(ds, t->docs[s], counts[s], t->starts[s]);
        t->n_tokens[s] = t->starts[s][counts[s]];
        first += counts[s];
    }
    free(perm);
    t->order = malloc((n_train + 1) * sizeof(uint64_t));
    t->order_starts = malloc((n_train + 1) * sizeof(uint64_t));
    if (!t->order || !t->order_starts) return st_fail(ST_ENOMEM, "task '%s': out of memory", t->name);
    t->order_epoch = NO_EPOCH;
    return 0;
}

static int make_probabilities(st_loader *L, const double *user_weights, st_mixing_strategy strategy, double temperature,
                              int64_t cap) {
    double *w = L->cum_prob, total = 0;
    for (int k = 0; k < L->n_tasks; k++) {
        st_loader_task *t = &L->tasks[k];
        double n = (double)t->n_windows;
        if (cap > 0 && n > (double)cap) n = (double)cap;
        if (strategy == ST_MIXING_PROPORTIONAL) w[k] = n;
        else if (strategy == ST_MIXING_TEMPERATURE) {
            if (!(temperature > 0) || !isfinite(temperature))
                return st_fail(ST_ECONFIG, "mixing.temperature must be > 0 (got %g)", temperature);
            w[k] = pow(n, 1.0 / temperature);
        } else if (strategy == ST_MIXING_WEIGHTS) {
            if (!user_weights) return st_fail(ST_ECONFIG, "mixing.strategy 'weights' needs a weight per task");
            w[k] = user_weights[k];
            if (!(w[k] > 0) || !isfinite(w[k]))
                return st_fail(ST_ECONFIG, "task '%s': weight must be > 0 (got %g)", t->name, w[k]);
        } else {
            return st_fail(ST_ECONFIG, "mixing.strategy %d is not proportional, temperature or weights", (int)strategy);
        }
        if (!isfinite(w[k]) || !(w[k] > 0))
            return st_fail(ST_ECONFIG, "task '%s': sampling weight %g is not a positive number", t->name, w[k]);
        total += w[k];
    }
    if (!isfinite(total)) return st_fail(ST_ECONFIG, "mixing weights overflow");
    double acc = 0;
    for (int k = 0; k < L->n_tasks; k++) {
        L->tasks[k].prob = w[k] / total;
        acc += L->tasks[k].prob;
        w[k] = acc;
    }
    w[L->n_tasks - 1] = 1.0; /* so every draw in [0,1) lands on a task despite rounding */
    return 0;
}

static int check_split(const double split[3]) {
    double sum = 0;
    for (int s = 0; s < 3; s++) {
        if (!(split[s] >= 0) || !isfinite(split[s]))
            return st_fail(ST_ECONFIG, "split[%d] = %g must be a fraction >= 0", s, split[s]);
        sum += split[s];
    }
    if (!(split[0] > 0)) return st_fail(ST_ECONFIG, "split[0] (train) must be > 0");
    if (fabs(sum - 1.0) > 1e-6) return st_fail(ST_ECONFIG, "split fractions sum to %g, not 1", sum);
    return 0;
}

static void use_epoch_order(const st_loader *L, st_loader_task *t, int k, uint64_t epoch);

/* Makes t->pack the packing of `epoch`'s document order (documents mode). */
static int use_epoch_packing(const st_loader *L, st_loader_task *t, int k, uint64_t epoch) {
    if (t->pack_epoch == epoch) return 0;
    use_epoch_order(L, t, k, epoch);
    st_packing_free(&t->pack);
    t->pack_epoch = NO_EPOCH;
    int rc = st_packing_build(&t->pack, t->ds, t->order, t->n_docs[ST_SPLIT_TRAIN], L->seq_len);
    if (rc == 0) t->pack_epoch = epoch;
    return rc;
}

/* Documents mode: each split's file-order packing, and epoch 0's (whose size is n_windows). */
static int init_documents(st_loader *L, st_loader_task *t, int k) {
    for (int s = 0; s < 3; s++) {
        int rc = st_packing_build(&t->split_pack[s], t->ds, t->docs[s], t->n_docs[s], L->seq_len);
        if (rc < 0) return rc;
    }
    if (t->split_pack[ST_SPLIT_TRAIN].n_seq == 0)
        return st_fail(ST_EINVAL, "task '%s': no train document has 2 or more tokens (nothing to predict)", t->name);
    t->pack_epoch = NO_EPOCH;
    int rc = use_epoch_packing(L, t, k, 0);
    if (rc < 0) return rc;
    t->n_windows = t->pack.n_seq;
    return 0;
}

static int init_tasks(st_loader *L, const st_dataset *const *datasets, const char *const *names,
                      const double split[3]) {
    for (int k = 0; k < L->n_tasks; k++) {
        st_loader_task *t = &L->tasks[k];
        if (names && names[k]) snprintf(t->name, sizeof t->name, "%s", names[k]);
        else snprintf(t->name, sizeof t->name, "task%d", k);
        t->ds = datasets[k];
        if (!t->ds || t->ds->n_docs == 0 || t->ds->n_tokens == 0)
            return st_fail(ST_EINVAL, "task '%s' has no data", t->name);
        int rc = make_splits(t, k, split, L->seed);
        if (rc < 0) return rc;
        if (L->packing == ST_PACKING_DOCUMENTS) {
            rc = init_documents(L, t, k);
            if (rc < 0) return rc;
            continue;
        }
        uint64_t need = (uint64_t)L->seq_len + 1;
        if (t->n_tokens[ST_SPLIT_TRAIN] < need)
            return st_fail(ST_EINVAL,
                           "task '%s': its train split has %llu tokens in %llu documents, fewer than seq_len+1 = %llu",
                           t->name, (unsigned long long)t->n_tokens[ST_SPLIT_TRAIN],
                           (unsigned long long)t->n_docs[ST_SPLIT_TRAIN], (unsigned long long)need);
        t->n_windows = (t->n_tokens[ST_SPLIT_TRAIN] - 1) / (uint64_t)L->seq_len;
    }
    return 0;
}

int st_loader_init(st_loader *L, int n_tasks, const st_dataset *const *datasets, const char *const *names,
                   const double *user_weights, st_mixing_strategy strategy, double temperature, int64_t cap,
                   const double split[3], int seq_len, uint64_t seed) {
    st_loader_options o = {n_tasks, datasets, names, user_weights, strategy, temperature, cap,
                           {split[0], split[1], split[2]}, seq_len, seed, ST_PACKING_STREAM};
    return st_loader_open(L, &o);
}

int st_loader_open(st_loader *L, const st_loader_options *o) {
    int n_tasks = o->n_tasks, seq_len = o->seq_len;
    const double *split = o->split;
    memset(L, 0, sizeof *L);
    if (o->packing != ST_PACKING_STREAM && o->packing != ST_PACKING_DOCUMENTS)
        return st_fail(ST_ECONFIG, "train.packing %d is not stream or documents", (int)o->packing);
    if (n_tasks < 1 || n_tasks > ST_LOADER_MAX_TASKS)
        return st_fail(ST_ECONFIG, "need 1..%d tasks, got %d", ST_LOADER_MAX_TASKS, n_tasks);
    if (seq_len < 1) return st_fail(ST_ECONFIG, "train.seq_len must be >= 1 (got %d)", seq_len);
    int rc = check_split(split);
    if (rc < 0) return rc;
    L->n_tasks = n_tasks;
    L->seq_len = seq_len;
    L->seed = o->seed;
    L->packing = o->packing;
    L->tasks = calloc((size_t)n_tasks, sizeof *L->tasks);
    L->cum_prob = calloc((size_t)n_tasks, sizeof *L->cum_prob);
    if (!L->tasks || !L->cum_prob) rc = st_fail(ST_ENOMEM, "out of memory for %d tasks", n_tasks);
    if (rc == 0) rc = init_tasks(L, o->datasets, o->names, split);
    if (rc == 0)
        rc = make_probabilities(L, o->weights, o->strategy, o->temperature, o->cap);
    if (rc < 0) st_loader_free(L);
    return rc;
}

void st_loader_free(st_loader *L) {
    if (!L) return;
    for (int k = 0; L->tasks && k < L->n_tasks; k++) {
        st_loader_task *t = &L->tasks[k];
        for (int s = 0; s < 3; s++) {
            free(t->docs[s]);
            free(t->starts[s]);
        }
        free(t->order);
        free(t->order_starts);
        st_packing_free(&t->pack);
        for (int s = 0; s < 3; s++) st_packing_free(&t->split_pack[s]);
    }
    free(L->tasks);
    free(L->cum_prob);
    memset(L, 0, sizeof *L);
}

void st_loader_probabilities(const st_loader *L, double *p) {
    for (int k = 0; k < L->n_tasks; k++) p[k] = L->tasks[k].prob;
}

/* ---------------------------------------------------------------- sampling */

/* The task of global slot `slot`: a pure function of (seed, slot) and the probabilities. */
static int slot_task(const st_loader *L, uint64_t slot) {
    if (L->n_tasks == 1) return 0;
    st_rng rng;
    st_rng_seed(&rng, L->seed, STREAM_SLOT(slot));
    double u = st_rng_uniform(&rng);
    int k = 0;
    while (k < L->n_tasks - 1 && u >= L->cum_prob[k]) k++;
    return k;
}

/* Makes t->order the train document order of `epoch`: the train docs (ascending) shuffled. */
static void use_epoch_order(const st_loader *L, st_loader_task *t, int k, uint64_t epoch) {
    if (t->order_epoch == epoch) return;
    uint64_t n = t->n_docs[ST_SPLIT_TRAIN];
    memcpy(t->order, t->docs[ST_SPLIT_TRAIN], n * sizeof(uint64_t));
    st_rng rng;
    st_rng_seed(&rng, L->seed, STREAM_EPOCH(k, epoch));
    st_rng_shuffle_u64(&rng, t->order, n);
    prefix_sums(t->ds, t->order, n, t->order_starts);
    t->order_epoch = epoch;
}

int st_loader_next(st_loader *L, int global_batch, int first_slot, int n_slots, int32_t *inputs, int32_t *targets,
                   float *target_mask, int *task_of_sample) {
    return st_loader_next_docs(L, global_batch, first_slot, n_slots, inputs, targets, target_mask, task_of_sample,
                               NULL, NULL);
}

/* Stream mode's segment ids and positions: one document per window. */
static void stream_positions(int T, int32_t *seg, int32_t *pos) {
    for (int j = 0; j < T; j++) {
        if (seg) seg[j] = 0;
        if (pos) pos[j] = j;
    }
}

/* Sequences in task t's current epoch (documents mode: that epoch's packing, built on demand). */
static int epoch_windows(const st_loader *L, st_loader_task *t, int k, uint64_t *n) {
    if (L->packing == ST_PACKING_STREAM) {
        *n = t->n_windows;
        return 0;
    }
    int rc = use_epoch_packing(L, t, k, t->epoch);
    *n = t->pack.n_seq;
    return rc;
}

int st_loader_next_docs(st_loader *L, int global_batch, int first_slot, int n_slots, int32_t *inputs,
                        int32_t *targets, float *target_mask, int *task_of_sample, int32_t *seg, int32_t *pos) {
    if (global_batch < 1 || first_slot < 0 || n_slots < 0 || first_slot > global_batch - n_slots)
        return st_fail(ST_EINVAL, "loader: slots [%d, %d+%d) are not inside a global batch of %d", first_slot,
                       first_slot, n_slots, global_batch);
    const int T = L->seq_len;
    /* Every rank walks the whole global batch so that each task's cursor advances identically. */
    for (int j = 0; j < global_batch; j++) {
        int k = slot_task(L, L->next_slot + (uint64_t)j);
        st_loader_task *t = &L->tasks[k];
        uint64_t n_win;
        int rc = epoch_windows(L, t, k, &n_win);
        if (rc == 0 && t->window >= n_win) {
            t->epoch++;
            t->window = 0;
            rc = epoch_windows(L, t, k, &n_win);
        }
        if (rc < 0) return rc;
        if (j >= first_slot && j < first_slot + n_slots) {
            size_t at = (size_t)(j - first_slot) * (size_t)T;
            if (L->packing == ST_PACKING_DOCUMENTS) {
                st_packing_fill(&t->pack, t->ds, t->window, inputs + at, targets + at, target_mask + at,
                                seg ? seg + at : NULL, pos ? pos + at : NULL);
            } else {
                use_epoch_order(L, t, k, t->epoch);
                gather_window(t->ds, t->order, t->order_starts, t->n_docs[ST_SPLIT_TRAIN], t->window * (uint64_t)T,
                              T, inputs + at, targets + at, target_mask + at);
                stream_positions(T, seg ? seg + at : NULL, pos ? pos + at : NULL);
            }
            if (task_of_sample) task_of_sample[j - first_slot] = k;
        }
        t->window++;
    }
    L->next_slot += (uint64_t)global_batch;
    return 0;
}

double st_loader_packing_efficiency(const st_loader *L, int task) {
    if (L->packing == ST_PACKING_STREAM || task < 0 || task >= L->n_tasks) return 1.0;
    const st_loader_task *t = &L->tasks[task];
    st_packing p0 = t->pack; /* epoch 0's efficiency is reported; recompute only if the cache moved on */
    if (t->pack_epoch == 0) return st_packing_efficiency(&p0);
    uint64_t *order = malloc((t->n_docs[ST_SPLIT_TRAIN] + 1) * sizeof *order);
    if (!order) return 0.0;
    memcpy(order, t->docs[ST_SPLIT_TRAIN], t->n_docs[ST_SPLIT_TRAIN] * sizeof *order);
    st_rng rng;
    st_rng_seed(&rng, L->seed, STREAM_EPOCH(task, 0));
    st_rng_shuffle_u64(&rng, order, t->n_docs[ST_SPLIT_TRAIN]);
    double e = 0.0;
    if (st_packing_build(&p0, t->ds, order, t->n_docs[ST_SPLIT_TRAIN], L->seq_len) == 0) {
        e = st_packing_efficiency(&p0);
        st_packing_free(&p0);
    }
    free(order);
    return e;
}

/* ---------------------------------------------------------------- resume state */

size_t st_loader_state_words(const st_loader *L) { return 5 + 3 * (size_t)L->n_tasks; }

void st_loader_state_save(const st_loader *L, uint64_t *w) {
    w[0] = L->packing == ST_PACKING_DOCUMENTS ? STATE_TAG_DOCS : STATE_TAG;
    w[1] = L->seed;
    w[2] = (uint64_t)L->seq_len;
    w[3] = (uint64_t)L->n_tasks;
    w[4] = L->next_slot;
    for (int k = 0; k < L->n_tasks; k++) {
        w[5 + 3 * k] = L->tasks[k].epoch;
        w[6 + 3 * k] = L->tasks[k].window;
        w[7 + 3 * k] = L->tasks[k].n_windows;
    }
}

int st_loader_state_restore(st_loader *L, const uint64_t *w, size_t n) {
    if (n < 5 || (w[0] != STATE_TAG && w[0] != STATE_TAG_DOCS))
        return st_fail(ST_EFORMAT, "data-loader state: unknown format");
    uint64_t want = L->packing == ST_PACKING_DOCUMENTS ? STATE_TAG_DOCS : STATE_TAG;
    if (w[0] != want)
        return st_fail(ST_EFORMAT, "data-loader state was saved with train.packing %s, the job has %s",
                       w[0] == STATE_TAG_DOCS ? "documents" : "stream",
                       L->packing == ST_PACKING_DOCUMENTS ? "documents" : "stream");
    if (w[3] != (uint64_t)L->n_tasks || n != st_loader_state_words(L))
        return st_fail(ST_EFORMAT, "data-loader state has %llu tasks, the job has %d", (unsigned long long)w[3],
                       L->n_tasks);
    if (w[1] != L->seed)
        return st_fail(ST_EFORMAT, "data-loader state was saved with seed %llu, the job has seed %llu",
                       (unsigned long long)w[1], (unsigned long long)L->seed);
    if (w[2] != (uint64_t)L->seq_len)
        return st_fail(ST_EFORMAT, "data-loader state was saved with seq_len %llu, the job has %d",
                       (unsigned long long)w[2], L->seq_len);
    for (int k = 0; k < L->n_tasks; k++) {
        const st_loader_task *t = &L->tasks[k];
        if (w[7 + 3 * k] != t->n_windows)
            return st_fail(ST_EFORMAT,
                           "task '%s': data-loader state has %llu train windows per epoch, the data now gives %llu "
                           "(dataset or split changed)", t->name, (unsigned long long)w[7 + 3 * k],
                           (unsigned long long)t->n_windows);
        if (L->packing == ST_PACKING_STREAM && w[6 + 3 * k] > t->n_windows)
            return st_fail(ST_EFORMAT, "task '%s': data-loader state window %llu is past the epoch's %llu", t->name,
                           (unsigned long long)w[6 + 3 * k], (unsigned long long)t->n_windows);
    }
    for (int k = 0; k < L->n_tasks; k++) { /* documents mode: the window must lie in its epoch's packing */
        st_loader_task *t = &L->tasks[k];
        if (L->packing == ST_PACKING_STREAM) continue;
        uint64_t save_epoch = t->epoch, n_win;
        t->epoch = w[5 + 3 * k];
        int rc = epoch_windows(L, t, k, &n_win);
        t->epoch = save_epoch;
        if (rc < 0) return rc;
        if (w[6 + 3 * k] > n_win)
            return st_fail(ST_EFORMAT, "task '%s': data-loader state sequence %llu is past the epoch's %llu", t->name,
                           (unsigned long long)w[6 + 3 * k], (unsigned long long)n_win);
    }
    L->next_slot = w[4];
    for (int k = 0; k < L->n_tasks; k++) {
        L->tasks[k].epoch = w[5 + 3 * k];
        L->tasks[k].window = w[6 + 3 * k];
    }
    return 0;
}

/* ---------------------------------------------------------------- evaluation */

int st_loader_eval_begin(const st_loader *L, int task, int split, st_loader_eval *it) {
    memset(it, 0, sizeof *it);
    if (task < 0 || task >= L->n_tasks) return st_fail(ST_EINVAL, "eval: no task %d", task);
    if (split < ST_SPLIT_TRAIN || split > ST_SPLIT_TEST) return st_fail(ST_EINVAL, "eval: no split %d", split);
    it->task = &L->tasks[task];
    it->split = split;
    it->seq_len = L->seq_len;
    it->packing = L->packing;
    uint64_t n = it->task->n_tokens[split];
    it->n_windows = n > (uint64_t)L->seq_len ? (n - 1) / (uint64_t)L->seq_len : 0;
    if (L->packing == ST_PACKING_DOCUMENTS) it->n_windows = it->task->split_pack[split].n_seq;
    return 0;
}

int st_loader_eval_next(st_loader_eval *it, int32_t *inputs, int32_t *targets, float *target_mask) {
    return st_loader_eval_next_docs(it, inputs, targets, target_mask, NULL, NULL);
}

int st_loader_eval_next_docs(st_loader_eval *it, int32_t *inputs, int32_t *targets, float *target_mask,
                             int32_t *seg, int32_t *pos) {
    if (!it->task || it->window >= it->n_windows) return 0;
    const st_loader_task *t = it->task;
    if (it->packing == ST_PACKING_DOCUMENTS) {
        st_packing_fill(&t->split_pack[it->split], t->ds, it->window, inputs, targets, target_mask, seg, pos);
    } else {
        gather_window(t->ds, t->docs[it->split], t->starts[it->split], t->n_docs[it->split],
                      it->window * (uint64_t)it->seq_len, it->seq_len, inputs, targets, target_mask);
        stream_positions(it->seq_len, seg, pos);
    }
    it->window++;
    return 1;
}
