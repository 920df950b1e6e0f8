/* train.h — the run loop: every rank executes st_train_run with the same config.
 *
 * Rank 0 is also the coordinator: it owns metrics.jsonl, the console line per step, the monitor server
 * and the control token. Every decision that must be the same on all ranks (stop, checkpoint, stage
 * change) is taken at a step boundary from a control word that rank 0 broadcasts. */
#ifndef ST_TRAIN_H
#define ST_TRAIN_H

#include <mpi.h>

#include "coordinator/config.h"

/* Why the run ended (maps to the process exit code in cmd_train.c). */
typedef enum {
    ST_RUN_FINISHED = 0,    /* all steps done, final/ written */
    ST_RUN_FAILED = 1,      /* an error; st_error() on the failing rank says why */
    ST_RUN_CHECKPOINTED = 2, /* stopped on a signal or `ctl stop` after a checkpoint: requeue/resume */
    ST_RUN_DIVERGED = 3      /* stopped on a non-finite loss / grad norm or a loss spike; nothing saved from it */
} st_run_result;

/* Runs the job described by cfg on `comm`. `reported` is set to 1 on ranks whose error message has
 * already been printed by the lowest failing rank's agreement (so callers print it only once). */
st_run_result st_train_run(const st_config *cfg, MPI_Comm comm, int *print_error);

/* Installs the signal handlers (SIGTERM + cfg->checkpoint.signal; SIGUSR1 when cfg is NULL, for the
 * time before the config is read) that request a checkpoint-and-exit at the next step boundary; they
 * only set a flag. */
void st_train_install_signals(const st_config *cfg);

#endif
