/* taskweight.c — see taskweight.h. */
#include "worker/taskweight.h"

#include <math.h>
#include <string.h>

void st_taskw_init(st_taskw *w, int n_tasks, int learned, double lr) {
    memset(w, 0, sizeof *w);
    w->n_tasks = n_tasks < ST_TASKW_MAX ? n_tasks : ST_TASKW_MAX;
    w->learned = learned;
    w->lr = lr;
}

double st_taskw_scale(const st_taskw *w, int k) {
    return w->learned && k < w->n_tasks ? exp(-w->s[k]) : 1.0;
}

void st_taskw_update(st_taskw *w, const double *loss_weight, const double *task_mean, const int *task_present) {
    if (!w->learned) return;
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    for (int k = 0; k < w->n_tasks; k++) {
        if (!task_present[k]) continue;
        double g = 1.0 - loss_weight[k] * exp(-w->s[k]) * task_mean[k];
        int t = ++w->step[k];
        w->m[k] = b1 * w->m[k] + (1 - b1) * g;
        w->v[k] = b2 * w->v[k] + (1 - b2) * g * g;
        double mhat = w->m[k] / (1 - pow(b1, t)), vhat = w->v[k] / (1 - pow(b2, t));
        w->s[k] -= w->lr * mhat / (sqrt(vhat) + eps);
    }
}

double st_taskw_penalty(const st_taskw *w, const int *task_present) {
    double p = 0;
    if (!w->learned) return 0;
    for (int k = 0; k < w->n_tasks; k++)
        if (task_present[k]) p += w->s[k];
    return p;
}
