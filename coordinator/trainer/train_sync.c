/* train_sync.c — the trainer's leaf helpers: the phase every rank publishes (probe and watchdog) and the
 * agreement of all ranks on a failure. Calls nothing else of the trainer but the watchdog's mark, so every
 * other file of the trainer may use it without a circle. */
#include "coordinator/trainer/train_internal.h"

#include "common/error.h"

void st_trainer_phase(trainer *t, st_phase phase) {
    if (t->probe) st_probe_set_phase(t->probe, phase);
    st_watchdog_mark(t->wd, t->wd_step, phase);
}

/* All ranks agree whether any rank failed; the lowest failing rank keeps print_error = 1. */
int st_trainer_agree(trainer *t, int rc) {
    int mine = rc ? t->rank : t->world, first = t->world;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, t->comm);
    if (first == t->world) return 0;
    t->print_error = first == t->rank;
    return rc ? rc : ST_ECOMM;
}

/* (train_internal.h) the communicator decides: all of it below ZeRO-3 */
void st_trainer_keep_part(void *ctx, const st_model *m, int i, size_t *a, size_t *b) { st_comm_param_keep(ctx, m, i, a, b); }
