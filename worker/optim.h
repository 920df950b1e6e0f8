/* optim.h — AdamW over a model's trainable parameters, learning-rate schedules and gradient clipping.
 *
 * The optimizer state (exp_avg, exp_avg_sq) covers one contiguous range [lo, hi) of the model's compact
 * gradient space (the whole space when unsharded, this rank's shard under ZeRO-1/2). It owns those two
 * buffers (backend memory). Per-parameter learning-rate scales (layer-wise decay) and the no-decay set
 * come from the model's registry. */
#ifndef ST_OPTIM_H
#define ST_OPTIM_H

#include <stddef.h>

#include "worker/model.h"
#include "worker/train_kinds.h" /* st_schedule */

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    st_schedule schedule;
    int warmup_steps, total_steps;
    float min_lr_ratio;
    float layer_lr_decay; /* lr x decay^(distance from the top layer); 1 = off */
} st_optim_config;

enum { ST_OPTIM_ZERO_ALL = 1, ST_OPTIM_ZERO_UNLESS_OVERWRITTEN = 2 }; /* st_optim.zero_grads */

typedef struct {
    st_optim_config cfg;
    size_t lo, hi;   /* range of the compact gradient space this optimizer updates */
    float *m, *v;    /* [hi - lo], backend memory */
    int *param_step; /* [n_params] updates each parameter has had since it became trainable (every rank
                        counts every parameter, so bias corrections agree whatever the sharding) */
    st_adamw_range *ranges; /* [n_params] host list handed to the backend's multi-tensor AdamW */
    int zero_grads; /* the update zeroes each gradient element it reads, in the same pass (the gradients
                       passed are then writable: the model's own, or ZeRO-3's shard; st_comm_update_params
                       sets it for the step's update and clears it after); ST_OPTIM_ZERO_UNLESS_OVERWRITTEN:
                       the model's own, except parameters the next step's first write overwrites anyway
                       (st_model_grad_overwritten) */
} st_optim;

/* Zeroed state for [lo, hi) of model m's current gradient space. */
int st_optim_init(st_optim *o, const st_optim_config *cfg, size_t lo, size_t hi, const st_model *m,
                  const st_backend *be);
/* Frees m, v and the range list (param_step stays: the caller may carry it over; free it with free()). */
void st_optim_free(st_optim *o, const st_backend *be);

/* After the trainable set changed: parameters trainable before and now take their moments from the
 * full old moment arrays (indexed by the old gradient offsets old_off[i], -1 = was frozen) and their
 * step counts from old_steps; new ones start at zero. */
void st_optim_carry_over(st_optim *o, const st_model *m, const long *old_off, const int *old_steps,
                         const float *old_m, const float *old_v);

/* Restores state saved for this optimizer's range: m_host, v_host [hi - lo] host arrays (unread when the
 * range is empty) and steps[n_params] (parameters frozen now get 0), as read from a checkpoint. */
void st_optim_restore(st_optim *o, const st_model *m, const float *m_host, const float *v_host, const int *steps);

/* Learning rate for the update that follows `step` completed updates (0-based). */
float st_lr_at(const st_optim_config *cfg, int step);

/* Learning-rate multiplier of a parameter: decay^(L-1-layer) for layer params, 1 for the head,
 * decay^L for embeddings. */
float st_param_lr_scale(const st_model *m, const st_param *p, float decay);

/* PyTorch clip_grad_norm_ factor: min(1, max_norm / (norm + 1e-6)); 1 when max_norm <= 0. */
float st_clip_scale(double grad_norm, float max_norm);

/* One AdamW update (every trainable parameter's step count advances) of parameters whose gradients lie
 * in [o->lo, o->hi), reading gradients from `grads` (indexed from o->lo: grads[0] is gradient element lo)
 * and writing the model's weights — and, under mixed precision, the same ranges of its bf16 copy — in
 * one multi-tensor call. */
void st_optim_update(st_optim *o, st_model *m, const float *grads, float lr, float grad_scale);

/* With o->zero_grads, both also zero the gradients they read (same pass; see st_optim).
 * st_optim_update in parts: count the step once (every trainable parameter's step count advances), then
 * update any number of disjoint sub-ranges [lo, hi) of the optimizer's range (st_comm_update_params
 * interleaves them with the parameter all-gather). */
void st_optim_count_step(st_optim *o, const st_model *m);
void st_optim_update_range(st_optim *o, st_model *m, const float *grads, float lr, float grad_scale, size_t lo,
                           size_t hi);

/* Registry-order visit of every trainable parameter's intersection with [lo, hi). */
typedef void (*st_param_range_fn)(void *ctx, const st_param *p, size_t start, size_t len);
void st_for_each_param_range(const st_model *m, size_t lo, size_t hi, st_param_range_fn fn, void *ctx);

#endif
