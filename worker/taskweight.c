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

int st_taskw_state_len(const st_taskw *w) { return 1 + 4 * w->n_tasks; }

void st_taskw_state_save(const st_taskw *w, double *out) {
    int n = w->n_tasks;
    out[0] = n;
    for (int k = 0; k < n; k++) {
        out[1 + k] = w->s[k];
        out[1 + n + k] = w->m[k];
        out[1 + 2 * n + k] = w->v[k];
        out[1 + 3 * n + k] = w->step[k];
    }
}

int st_taskw_state_restore(st_taskw *w, const double *in, int len) {
    int n = w->n_tasks;
    if (len != 1 + 4 * n || (int)in[0] != n) return -1;
    for (int k = 0; k < n; k++) {
        w->s[k] = in[1 + k];
        w->m[k] = in[1 + n + k];
        w->v[k] = in[1 + 2 * n + k];
        w->step[k] = (int)in[1 + 3 * n + k];
    }
    return 0;
}
