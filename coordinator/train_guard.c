/* train_guard.c — the divergence guard: which steps may reach the weights (train.on_nonfinite,
 * train.loss_spike, train.max_nonfinite_skips). A bad step is never applied, so the weights, the
 * optimizer state and every checkpoint stay those of the last good step. */
#include "coordinator/train_internal.h"

#include <math.h>
#include <string.h>

#define SPIKE_WARMUP 5     /* good steps before the running mean is trusted for spike detection */
#define SPIKE_MEAN_DECAY 0.9

const char *st_trainer_bad_step(trainer *t, double loss, double grad_norm) {
    if (!isfinite(loss)) return "non-finite loss";
    if (!isfinite(grad_norm)) return "non-finite gradient norm";
    double spike = t->cfg->train.loss_spike;
    if (spike > 0 && t->good_steps >= SPIKE_WARMUP && loss > spike * t->loss_mean) return "loss spike";
    t->loss_mean = t->good_steps == 0 ? loss : SPIKE_MEAN_DECAY * t->loss_mean + (1 - SPIKE_MEAN_DECAY) * loss;
    t->good_steps++;
    return NULL;
}

/* After a step: 0 to go on, 1 when the run must stop (the console line is printed on rank 0). */
int st_trainer_guard(trainer *t, int64_t step, const st_step_result *r) {
    const st_config *c = t->cfg;
    if (!r->bad) {
        t->skips_in_a_row = 0;
        st_trainer_confirm_checkpoint(t);
        return 0;
    }
    t->skips_in_a_row++;
    int stop = c->train.on_nonfinite == ST_NONFINITE_STOP || t->skips_in_a_row >= c->train.max_nonfinite_skips;
    if (t->rank == 0) {
        char why[160];
        if (!strcmp(r->bad, "loss spike"))
            snprintf(why, sizeof why, "loss spike: %.6g > train.loss_spike %g x recent mean %.6g", r->loss,
                     c->train.loss_spike, t->loss_mean);
        else snprintf(why, sizeof why, "%s: loss %g, grad norm %g", r->bad, r->loss, r->grad_norm);
        if (stop && c->train.on_nonfinite == ST_NONFINITE_STOP)
            fprintf(stderr, "shardtune train: error: step %lld diverged (%s); the step was not applied and nothing was "
                            "saved from it (train.on_nonfinite: stop; lower train.lr or use train.on_nonfinite=skip)\n",
                    (long long)step + 1, why);
        else if (stop)
            fprintf(stderr, "shardtune train: error: step %lld diverged (%s): %d steps in a row skipped "
                            "(train.max_nonfinite_skips %d); stopping without saving from the bad state\n",
                    (long long)step + 1, why, t->skips_in_a_row, c->train.max_nonfinite_skips);
        else
            fprintf(stderr, "shardtune train: warning: step %lld skipped (%s); %d in a row, stop at %d\n",
                    (long long)step + 1, why, t->skips_in_a_row, c->train.max_nonfinite_skips);
        fflush(stderr);
    }
    if (stop) st_trainer_set_aside_checkpoint(t);
    if (t->mon)
        st_monitor_event(t->mon, stop ? "diverged" : "step_skipped", step + 1, "%s (loss %g, grad norm %g)", r->bad,
                         r->loss, r->grad_norm);
    return stop;
}
