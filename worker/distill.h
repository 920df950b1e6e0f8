/* distill.h — knowledge distillation loss in the LM head (DESIGN.md `distill:`).
 *
 * Per target token: loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), with s the
 * student's and t the teacher's logits for that token. The teacher (any model with the same vocabulary,
 * frozen, in the job's precision: fp32, or bf16 with its bf16 weight copy) runs forward on the batch first; then,
 * in the student's chunked LM head, the teacher's
 * logits for the same rows are computed from its final hidden states chunk by chunk, so neither model's
 * [N, V] logits exist whole. The gradient handed back to the student's head is
 * weight * (alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y))).
 * Any backend with kd_loss (cpu, cuda): the teacher's logits and the loss stay in backend memory, the KD and
 * CE sums accumulate there and are read once per step (st_distill_parts). st_distill owns its scratch; the
 * teacher model is the caller's (on the student's backend). */
#ifndef ST_DISTILL_H
#define ST_DISTILL_H

#include <stdint.h>

#include "worker/model.h"

typedef struct {
    st_model *teacher;     /* activations allocated for the student's B x T; not owned */
    float temperature, alpha;
    float *t_logits;       /* backend memory: one head chunk of teacher logits */
    size_t t_logits_floats;
    double *sums;          /* backend memory: sum of weight * kd and weight * ce since st_distill_reset */
    int32_t *no_targets;   /* [B*T] zeros (host): the teacher's forward computes no loss */
    float *no_weight;
    float *capture_t_logits; /* optional host [B*T, V]: the teacher's logits are copied here (tests) */
} st_distill;

/* Checks the pair (same vocabulary, same backend with kd_loss, temperature > 0, alpha in [0, 1]) and makes the
 * teacher's forward stop at its final hidden states (teacher->hidden_only). */
int st_distill_init(st_distill *d, st_model *teacher, const st_model *student, float temperature, float alpha);
/* be: the backend the pair ran on (NULL when init never succeeded: host memory only). */
void st_distill_free(st_distill *d, const st_backend *be);
/* Zeroes the KD and CE sums (the start of a step). */
void st_distill_reset(st_distill *d);
/* The sums of weight * kd and weight * ce since the last reset (one host wait). */
void st_distill_parts(const st_distill *d, double *kd, double *ce);

/* Runs the teacher on inputs[B*T] and makes the student's next forward use the distillation loss. */
void st_distill_attach(st_distill *d, st_model *student, const int32_t *inputs);

/* Back to plain cross-entropy for the student's next forward (evaluation). */
void st_distill_detach(st_model *student);

#endif
