/* slurm_env.h — what the launcher (srun, mpirun, or nothing) tells this process about itself.
 *
 * st_slurm_env_read() reads the environment once into a plain struct (no pointers into the
 * environment: every string is copied, nothing to free). It does not need MPI, so it can run before
 * MPI_Init. Which variables win:
 *   - OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK when set: mpirun started this process, even inside a
 *     Slurm allocation, where the SLURM_PROCID/SLURM_LOCALID it inherits describe mpirun's daemon step,
 *     not this rank;
 *   - otherwise SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (srun started it);
 *   - SLURM_JOB_ID, SLURM_RESTART_COUNT and SLURM_NODELIST in both cases (the job, not the step).
 *
 * Run directory rule (st_slurm_apply_run_dir): when run_dir is left at its default (runs/<job file stem>)
 * and SLURM_JOB_ID is set, the run directory becomes runs/<stem>-<SLURM_JOB_ID>. A requeued job keeps its
 * job id, so every restart of one sbatch submission finds its own checkpoints (resume: auto), while two
 * submissions of the same JOB.yaml never share (or resume from) each other's run directory. An explicit
 * run_dir is never changed: set one to continue a run across separate submissions. checkpoint.dir follows
 * the run directory when it was left at its default (RUN_DIR/checkpoints). */
#ifndef ST_SLURM_ENV_H
#define ST_SLURM_ENV_H

#include <stddef.h>

#include "coordinator/config/config.h"

typedef enum {
    ST_LAUNCHER_NONE = 0, /* started alone (singleton MPI) */
    ST_LAUNCHER_SRUN,     /* SLURM_PROCID set, no OMPI_COMM_WORLD_RANK */
    ST_LAUNCHER_MPIRUN    /* OMPI_COMM_WORLD_RANK set (inside an allocation or not) */
} st_launcher;

typedef struct {
    st_launcher launcher;
    char job_id[32];      /* SLURM_JOB_ID ("" outside Slurm); digits only (checked: it ends up in a path) */
    int restart_count;    /* SLURM_RESTART_COUNT, 0 when unset (first run) */
    int rank, world;      /* this process's rank and the number of ranks (0 / 1 when nothing says) */
    int local_rank;       /* rank among the ranks on this node (device index); 0 when nothing says */
    char nodelist[256];   /* SLURM_NODELIST (compressed form, e.g. "n[1-2]"), "" outside Slurm; truncated */
    char host[64];        /* SLURMD_NODENAME when set (the Slurm node name), else gethostname() */
} st_slurm_env;

/* Fills *env from the environment. Returns 0, or ST_EINVAL naming the variable when one of the
 * variables above holds something that is not a valid number (or a job id that is not digits). */
int st_slurm_env_read(st_slurm_env *env);

/* Applies the run directory rule above to cfg (cfg->source must be the job file path, as st_config_load
 * leaves it). Returns 1 when run_dir was changed, 0 when not, or ST_ECONFIG when the new path is too long. */
int st_slurm_apply_run_dir(const st_slurm_env *env, st_config *cfg);

/* Writes the one-line startup description (no newline) into buf:
 *   "slurm: job J restart R, rank P/N local L on host H"   under Slurm (srun, or mpirun in an allocation)
 *   "mpirun: rank P/N local L on host H"                    under mpirun outside Slurm
 *   ""                                                      alone
 * Returns the length written (0 = nothing to log). */
size_t st_slurm_env_describe(const st_slurm_env *env, char *buf, size_t size);

#endif
