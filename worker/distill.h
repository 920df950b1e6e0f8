/* distill.h — knowledge distillation loss in the LM head (DESIGN.md `distill:`).
 *
 * Per target token: loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), with s the
 * student's and t the teacher's logits for that token. The teacher (any model with the same vocabulary,
 * frozen, fp32) runs forward on the batch first; then, in the student's chunked LM head, the teacher's
 * logits for the same rows are computed from its final hidden states chunk by chunk, so neither model's
 * [N, V] logits exist whole. The gradient handed back to the student's head is
 * weight * (alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y))).
 * CPU backend only for now (the loss runs on host memory). st_distill owns its scratch; the teacher model
 * is the caller's. */
#ifndef ST_DISTILL_H
#define ST_DISTILL_H

#include <stdint.h>

#include "worker/model.h"

typedef struct {
    st_model *teacher;     /* activations allocated for the student's B x T; not owned */
    float temperature, alpha;
    float *t_logits;       /* scratch for one head chunk of teacher logits */
    size_t t_logits_floats;
    double kd_sum, ce_sum; /* sum of weight * kd and weight * ce since the last st_distill_reset */
    int32_t *no_targets;   /* [B*T] zeros: the teacher's forward computes no loss */
    float *no_weight;
} st_distill;

/* Checks the pair (same vocabulary, CPU backend, temperature > 0, alpha in [0, 1]) and makes the teacher's
 * forward stop at its final hidden states (teacher->hidden_only). */
int st_distill_init(st_distill *d, st_model *teacher, const st_model *student, float temperature, float alpha);
void st_distill_free(st_distill *d);
void st_distill_reset(st_distill *d);

/* Runs the teacher on inputs[B*T] and makes the student's next forward use the distillation loss. */
void st_distill_attach(st_distill *d, st_model *student, const int32_t *inputs);

/* Back to plain cross-entropy for the student's next forward (evaluation). */
void st_distill_detach(st_model *student);

/* The loss of rows [0, n) given both logits (host memory): loss[i] unweighted, s_logits overwritten with
 * dlogits (weight-scaled; zero rows where weight is 0). Returns sum weight * loss; adds to *kd, *ce. */
double st_distill_rows(float *s_logits, const float *t_logits, float *loss, const int32_t *targets,
                       const float *weight, int n, int v, float temperature, float alpha, double *kd, double *ce);

#endif
