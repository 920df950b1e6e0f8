/* cmd_train.c — `shardtune train JOB.yaml [a.b=value ...]`, started once per rank (srun, mpirun, alone).
 *
 * Rank 0 parses the YAML and broadcasts the canonical JSON dump; the other ranks parse the dump, so
 * every rank runs exactly the same config. Exit codes: 0 done, 1 error, 2 usage, 3 diverged (nothing saved
 * from the bad step), 85 checkpointed on request. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "coordinator/config/config.h"
#include "coordinator/config/slurm_env.h"
#include "coordinator/trainer/train.h"
#include "shardtune.pb-c.h"

/* Loads the config on rank 0 and shares it as a serialized shardtune.JobSpec (the canonical JSON of
 * every key); returns 0 on every rank or an error on every rank. */
static int load_shared_config(int argc, char **argv, st_config *cfg, int rank, st_slurm_env *senv) {
    long len = 0;
    uint8_t *buf = NULL;
    int rc = 0;
    if (rank == 0) {
        char *json = NULL;
        rc = st_slurm_env_read(senv);
        if (!rc) rc = st_config_load(cfg, argv[1], argc - 2, argv + 2);
        if (!rc && st_slurm_apply_run_dir(senv, cfg) < 0) rc = ST_ECONFIG; /* run_dir stable across requeues */
        if (!rc) rc = st_config_to_json(cfg, &json);
        if (!rc) {
            Shardtune__JobSpec spec = SHARDTUNE__JOB_SPEC__INIT;
            spec.version = 1;
            spec.config_json = json;
            spec.source = argv[1];
            len = (long)shardtune__job_spec__get_packed_size(&spec);
            buf = malloc((size_t)len + 1);
            if (buf) shardtune__job_spec__pack(&spec, buf);
            else rc = st_fail(ST_ENOMEM, "out of memory");
        }
        free(json);
        if (rc) len = -1;
    }
    MPI_Bcast(&len, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    if (len < 0) return rc ? rc : ST_ECONFIG;
    if (rank != 0) {
        buf = malloc((size_t)len + 1);
        if (!buf) return st_fail(ST_ENOMEM, "out of memory");
    }
    MPI_Bcast(buf, (int)len, MPI_BYTE, 0, MPI_COMM_WORLD);
    if (rank != 0) {
        Shardtune__JobSpec *spec = shardtune__job_spec__unpack(NULL, (size_t)len, buf);
        if (!spec || !spec->config_json) rc = st_fail(ST_EFORMAT, "the JobSpec broadcast by rank 0 does not decode");
        if (!rc) rc = st_config_load_string(cfg, spec->config_json, 0, NULL);
        if (!rc) snprintf(cfg->source, sizeof cfg->source, "%s", spec->source ? spec->source : argv[1]);
        if (spec) shardtune__job_spec__free_unpacked(spec, NULL);
    }
    free(buf);
    return rc;
}

int st_cmd_train(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') {
        /* as st_cli_missing / st_cli_bad_arg (main.c), which tests/tools/fakedev.c, linking this file, lacks */
        if (argc < 2) fprintf(stderr, "shardtune train: error: missing JOB.yaml\n");
        else fprintf(stderr, "shardtune train: error: unknown or incomplete argument '%s'\n", argv[1]);
        fprintf(stderr, "usage: shardtune train JOB.yaml [dotted.key=value ...]\n");
        return ST_EXIT_USAGE;
    }
    int provided = 0, rank = 0;
    st_train_install_signals(NULL); /* a preemption signal during start-up is kept, not fatal */
    /* MULTIPLE: checkpoint.async writes with collective MPI-IO from a thread of its own */
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    static st_config cfg; /* large (fixed arrays): keep it off the stack */
    st_slurm_env senv;
    memset(&senv, 0, sizeof senv);
    int rc = load_shared_config(argc, argv, &cfg, rank, &senv);
    if (rc) {
        if (rank == 0) st_cli_error("train", st_error());
        MPI_Finalize();
        return ST_EXIT_FAIL;
    }
    st_train_install_signals(&cfg);
    char where[256];
    if (rank == 0 && st_slurm_env_describe(&senv, where, sizeof where)) {
        printf("%s\n", where);
        fflush(stdout);
    }
    int print_error = 0;
    st_run_result res = st_train_run(&cfg, MPI_COMM_WORLD, &print_error);
    if (res == ST_RUN_FAILED && print_error) {
        int world = 1;
        MPI_Comm_size(MPI_COMM_WORLD, &world);
        if (world > 1) {
            char ctx[1200];
            snprintf(ctx, sizeof ctx, "rank %d: %s", rank, st_error());
            st_cli_error("train", ctx);
        } else {
            st_cli_error("train", st_error());
        }
    }
    MPI_Finalize();
    return res == ST_RUN_FINISHED       ? ST_EXIT_OK
           : res == ST_RUN_CHECKPOINTED ? ST_EXIT_REQUEUE
           : res == ST_RUN_DIVERGED     ? ST_EXIT_DIVERGED
                                        : ST_EXIT_FAIL;
}
