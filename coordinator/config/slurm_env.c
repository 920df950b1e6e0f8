/* slurm_env.c — reads the launcher's environment variables (see slurm_env.h). No allocation. */
#include "coordinator/config/slurm_env.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/util.h"

/* *out = the non-negative int in variable `name`; `fallback` when it is unset or empty. */
static int env_int(const char *name, int fallback, int *out) {
    const char *s = getenv(name);
    if (!s || !*s) return *out = fallback, 0;
    errno = 0;
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < 0 || v > INT_MAX)
        return st_fail(ST_EINVAL, "environment: %s='%.40s' is not a non-negative integer", name, s);
    *out = (int)v;
    return 0;
}

static void copy_str(char *dst, size_t size, const char *src) {
    snprintf(dst, size, "%s", src ? src : "");
}

static int read_job_id(st_slurm_env *env) {
    const char *id = getenv("SLURM_JOB_ID");
    if (!id || !*id) return 0;
    size_t n = strlen(id);
    if (n >= sizeof env->job_id || strspn(id, "0123456789") != n)
        return st_fail(ST_EINVAL, "environment: SLURM_JOB_ID='%.40s' is not a job number", id);
    memcpy(env->job_id, id, n + 1);
    return 0;
}

/* rank/world/local from one family of variables (OMPI_COMM_WORLD_* or SLURM_*) */
static int read_placement(st_slurm_env *env, const char *rank, const char *size, const char *local) {
    int rc = env_int(rank, 0, &env->rank);
    if (!rc) rc = env_int(size, 1, &env->world);
    if (!rc) rc = env_int(local, 0, &env->local_rank);
    if (rc) return rc;
    if (env->world < 1 || env->rank >= env->world)
        return st_fail(ST_EINVAL, "environment: %s=%d is not below %s=%d", rank, env->rank, size, env->world);
    return 0;
}

int st_slurm_env_read(st_slurm_env *env) {
    if (!env) return st_fail(ST_EINVAL, "st_slurm_env_read: NULL argument");
    memset(env, 0, sizeof *env);
    env->world = 1;
    int rc = read_job_id(env);
    if (!rc) rc = env_int("SLURM_RESTART_COUNT", 0, &env->restart_count);
    if (rc) return rc;
    const char *ompi = getenv("OMPI_COMM_WORLD_RANK");
    const char *srun = getenv("SLURM_PROCID");
    if (ompi && *ompi) {
        env->launcher = ST_LAUNCHER_MPIRUN;
        rc = read_placement(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK");
    } else if (srun && *srun) {
        env->launcher = ST_LAUNCHER_SRUN;
        rc = read_placement(env, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID");
    }
    if (rc) return rc;
    copy_str(env->nodelist, sizeof env->nodelist, getenv("SLURM_NODELIST"));
    const char *node = getenv("SLURMD_NODENAME");
    if (node && *node) {
        copy_str(env->host, sizeof env->host, node);
    } else if (gethostname(env->host, sizeof env->host) != 0) {
        copy_str(env->host, sizeof env->host, "?");
    }
    env->host[sizeof env->host - 1] = 0; /* gethostname need not terminate a truncated name */
    return 0;
}

int st_slurm_apply_run_dir(const st_slurm_env *env, st_config *cfg) {
    if (!env || !cfg || !env->job_id[0]) return 0;
    char stem[ST_CFG_PATH_MAX], def[ST_CFG_PATH_MAX + 8];
    st_path_stem(cfg->source, stem, sizeof stem);
    snprintf(def, sizeof def, "runs/%s", stem[0] ? stem : "job");
    if (strcmp(cfg->run_dir, def) != 0) return 0; /* the user chose a run_dir: keep it */
    char run_dir[ST_CFG_PATH_MAX], ckpt_default[ST_CFG_PATH_MAX + 32];
    int n = snprintf(run_dir, sizeof run_dir, "%s-%s", def, env->job_id);
    if (n < 0 || (size_t)n >= sizeof run_dir)
        return st_fail(ST_ECONFIG, "run_dir: %s-%s is too long", def, env->job_id);
    snprintf(ckpt_default, sizeof ckpt_default, "%s/checkpoints", def);
    if (!strcmp(cfg->checkpoint.dir, ckpt_default)) {
        n = snprintf(cfg->checkpoint.dir, sizeof cfg->checkpoint.dir, "%s/checkpoints", run_dir);
        if (n < 0 || (size_t)n >= sizeof cfg->checkpoint.dir)
            return st_fail(ST_ECONFIG, "checkpoint.dir: %s/checkpoints is too long", run_dir);
    }
    memcpy(cfg->run_dir, run_dir, sizeof run_dir);
    return 1;
}

size_t st_slurm_env_describe(const st_slurm_env *env, char *buf, size_t size) {
    if (!buf || size == 0) return 0;
    buf[0] = 0;
    if (!env) return 0;
    int n = 0;
    if (env->job_id[0])
        n = snprintf(buf, size, "slurm: job %s restart %d, rank %d/%d local %d on host %s", env->job_id,
                     env->restart_count, env->rank, env->world, env->local_rank, env->host);
    else if (env->launcher == ST_LAUNCHER_MPIRUN)
        n = snprintf(buf, size, "mpirun: rank %d/%d local %d on host %s", env->rank, env->world, env->local_rank,
                     env->host);
    if (n < 0) return buf[0] = 0, 0;
    return (size_t)n < size ? (size_t)n : size - 1;
}
