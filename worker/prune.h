/* prune.h — structured pruning: importance on calibration windows, then a smaller model with whole layers,
 * KV groups of attention heads and FFN channels removed (see docs/compress.md).
 *
 * Importance measures (all measured once, on the unpruned model, fp32 forward over the calibration windows):
 *  - layer l: block influence BI_l = 1 - mean over tokens of cos(x_l, x_{l+1}), the cosine between the
 *    residual stream entering and leaving the layer (ShortGPT); the lowest BI goes first;
 *  - KV group g of layer l (its n_head/n_kv_head query heads with their shared key/value head; one head for
 *    GPT-2): mean over tokens of the L2 norm of the group's contribution to the residual stream,
 *    || W_o[:, cols of g] a_t[cols of g] ||;
 *  - FFN channel j of layer l: sqrt(mean over tokens of h_t[j]^2) * ||W_down[:, j]||, the RMS of the
 *    activation entering the down projection times the norm of the column it multiplies.
 * Every kept layer keeps the same number of groups and channels (a config.json has one n_head and one
 * intermediate_size), each layer its own top-scoring ones, in their original order.
 * Stats and plans own their arrays (free with the matching _free). */
#ifndef ST_PRUNE_H
#define ST_PRUNE_H

#include <stdint.h>

#include "worker/model.h"

typedef struct {
    int L, G, F;         /* source layers, KV groups per layer, FFN channels per layer */
    double *layer_bi;    /* [L] */
    double *group_score; /* [L*G] */
    double *chan_score;  /* [L*F] */
    double loss;         /* mean loss per target over the windows */
    double targets;
} st_prune_stats;

/* Runs the model (activations allocated for m->B x T, fp32) over n windows: inputs/targets/weight are
 * [n*T] (weight 1 for a target, 0 for none). With `importance` set, also fills the importance scores. */
int st_prune_calibrate(st_model *m, const int32_t *inputs, const int32_t *targets, const float *weight, int n,
                       int importance, st_prune_stats *s);
void st_prune_stats_free(st_prune_stats *s);

typedef struct {
    const unsigned char *drop_layer; /* [L] explicit layers to drop (NULL: none) */
    int drop_auto;                   /* or: drop this many layers of lowest block influence */
    double prune_heads;              /* fraction of KV groups removed in every layer, [0, 1) */
    double prune_ffn;                /* fraction of FFN channels removed in every layer, [0, 1) */
} st_prune_spec;

typedef struct {
    int n_layer, *layers;   /* kept source layers, ascending */
    int groups, *group;     /* kept KV groups per layer; group[l*groups + k] (new layer l) */
    int chans, *chan;       /* kept FFN channels per layer; chan[l*chans + k] */
} st_prune_plan;

/* Decides what is kept. `s` may be NULL when nothing needs importance (explicit layers only). */
int st_prune_plan_make(const st_model_config *c, const st_prune_spec *spec, const st_prune_stats *s,
                       st_prune_plan *p);
void st_prune_plan_free(st_prune_plan *p);

/* Builds `dst` on backend `be` with the smaller config and copies the kept weights from src_host
 * (src's weights, host memory, internal layout). */
int st_prune_apply(const st_model *src, const float *src_host, const st_prune_plan *p, const st_backend *be,
                   st_model *dst);

#endif
