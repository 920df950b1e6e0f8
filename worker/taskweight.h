/* taskweight.h — multi-task loss weighting: fixed per-task weights, or learned homoscedastic
 * uncertainty (Kendall, Gal & Cipolla 2018).
 *
 * With uncertainty weighting each task k has a learned log-variance s_k and the objective is
 *     L = sum_k ( loss_weight_k * exp(-s_k) * L_k + s_k )
 * where L_k is the mean loss over task k's target tokens in the global batch. A noisy (hard) task
 * grows its s_k and so its weight exp(-s_k) shrinks. The s_k are tiny, replicated on every rank, and
 * updated with their own Adam (step size loss_weighting_lr) from dL/ds_k = 1 - loss_weight_k exp(-s_k) L_k,
 * using the all-reduced task means, so every rank takes the same step. Plain struct; no heap. */
#ifndef ST_TASKWEIGHT_H
#define ST_TASKWEIGHT_H

#define ST_TASKW_MAX 64

typedef struct {
    int n_tasks;
    int learned;            /* 0: weights are the fixed loss_weight; 1: uncertainty */
    double lr;              /* Adam step size of s */
    double s[ST_TASKW_MAX]; /* log-variances */
    double m[ST_TASKW_MAX], v[ST_TASKW_MAX];
    int step[ST_TASKW_MAX]; /* Adam steps per task (a task absent from a batch takes none) */
} st_taskw;

void st_taskw_init(st_taskw *w, int n_tasks, int learned, double lr);

/* Multiplier of task k's loss_weight in the objective: exp(-s_k), or 1 when not learned. */
double st_taskw_scale(const st_taskw *w, int k);

/* One Adam step on s from this batch's task means (task_present[k] = 0: no targets of task k). */
void st_taskw_update(st_taskw *w, const double *loss_weight, const double *task_mean, const int *task_present);

/* The objective's regularizer sum_k s_k over present tasks (0 when not learned). */
double st_taskw_penalty(const st_taskw *w, const int *task_present);

#endif
