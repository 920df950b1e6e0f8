/* test_slurm_env.c — launcher environment parsing, the Slurm run directory rule and the startup line.
 * Configs come from real YAML files through st_config_load, so the "default run_dir" the rule
 * recognises is the one the config module really derives. Expected strings are written out here. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "coordinator/config/config.h"
#include "coordinator/config/slurm_env.h"
#include "test_tmpdir.h"

static const char *VARS[] = {"SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
                             "SLURM_LOCALID", "SLURM_NODELIST", "SLURMD_NODENAME", "OMPI_COMM_WORLD_RANK",
                             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"};

static int setup(void **state) {
    for (size_t i = 0; i < sizeof VARS / sizeof VARS[0]; i++) unsetenv(VARS[i]);
    return st_test_dir_setup(state);
}

static void srun_env(void) {
    setenv("SLURM_JOB_ID", "4242", 1);
    setenv("SLURM_RESTART_COUNT", "2", 1);
    setenv("SLURM_PROCID", "3", 1);
    setenv("SLURM_NTASKS", "4", 1);
    setenv("SLURM_LOCALID", "1", 1);
    setenv("SLURM_NODELIST", "n[1-2]", 1);
    setenv("SLURMD_NODENAME", "n2", 1);
}

static void test_alone(void **state) {
    (void)state;
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(e.launcher, ST_LAUNCHER_NONE);
    assert_string_equal(e.job_id, "");
    assert_int_equal(e.rank, 0);
    assert_int_equal(e.world, 1);
    assert_int_equal(e.restart_count, 0);
    assert_true(strlen(e.host) > 0);
    char line[256] = "x";
    assert_int_equal(st_slurm_env_describe(&e, line, sizeof line), 0);
    assert_string_equal(line, "");
}

static void test_srun(void **state) {
    (void)state;
    srun_env();
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(e.launcher, ST_LAUNCHER_SRUN);
    assert_string_equal(e.job_id, "4242");
    assert_int_equal(e.restart_count, 2);
    assert_int_equal(e.rank, 3);
    assert_int_equal(e.world, 4);
    assert_int_equal(e.local_rank, 1);
    assert_string_equal(e.nodelist, "n[1-2]");
    assert_string_equal(e.host, "n2");
    char line[256];
    size_t n = st_slurm_env_describe(&e, line, sizeof line);
    assert_string_equal(line, "slurm: job 4242 restart 2, rank 3/4 local 1 on host n2");
    assert_int_equal(n, strlen(line));
    /* truncation keeps a terminated prefix */
    char small[12];
    n = st_slurm_env_describe(&e, small, sizeof small);
    assert_int_equal(n, 11);
    assert_string_equal(small, "slurm: job ");
}

/* mpirun inside an allocation: the inherited SLURM_PROCID/LOCALID describe mpirun's daemon, not us */
static void test_mpirun_in_allocation(void **state) {
    (void)state;
    srun_env();
    setenv("SLURM_PROCID", "0", 1);
    setenv("SLURM_LOCALID", "0", 1);
    setenv("OMPI_COMM_WORLD_RANK", "5", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "8", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(e.launcher, ST_LAUNCHER_MPIRUN);
    assert_int_equal(e.rank, 5);
    assert_int_equal(e.world, 8);
    assert_int_equal(e.local_rank, 1);
    assert_string_equal(e.job_id, "4242");
    char line[256];
    st_slurm_env_describe(&e, line, sizeof line);
    assert_string_equal(line, "slurm: job 4242 restart 2, rank 5/8 local 1 on host n2");
}

static void test_mpirun_alone(void **state) {
    (void)state;
    setenv("OMPI_COMM_WORLD_RANK", "1", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    setenv("SLURMD_NODENAME", "box", 1); /* only used for the host name here */
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    char line[256];
    st_slurm_env_describe(&e, line, sizeof line);
    assert_string_equal(line, "mpirun: rank 1/2 local 1 on host box");
}

static void expect_env_error(const char *var, const char *value, const char *needle) {
    setup(NULL);
    srun_env();
    setenv(var, value, 1);
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), ST_EINVAL);
    if (!strstr(st_error(), needle)) fail_msg("message '%s' lacks '%s'", st_error(), needle);
    st_test_dir_teardown(NULL);
}

static void test_bad_values(void **state) {
    (void)state;
    expect_env_error("SLURM_PROCID", "abc", "SLURM_PROCID='abc'");
    expect_env_error("SLURM_NTASKS", "-2", "SLURM_NTASKS='-2'");
    expect_env_error("SLURM_RESTART_COUNT", "1x", "SLURM_RESTART_COUNT='1x'");
    expect_env_error("SLURM_LOCALID", "99999999999999", "SLURM_LOCALID");
    expect_env_error("SLURM_PROCID", "4", "SLURM_PROCID=4 is not below SLURM_NTASKS=4");
    expect_env_error("SLURM_JOB_ID", "../../etc", "SLURM_JOB_ID='../../etc'");
    expect_env_error("SLURM_JOB_ID", "12 ", "SLURM_JOB_ID");
}

static void write_job(const char *name, const char *extra, char *path, size_t size) {
    snprintf(path, size, "%s/%s", st_test_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "model: {path: models/tiny}\ntasks:\n  - {name: qa, path: data/qa.h5}\n%s", extra);
    fclose(f);
}

static void test_run_dir_default_under_slurm(void **state) {
    (void)state;
    static st_config c;
    char path[512];
    write_job("qa.v2.yaml", "", path, sizeof path);
    assert_int_equal(st_config_load(&c, path, 0, NULL), 0);
    assert_string_equal(c.run_dir, "runs/qa.v2"); /* DESIGN.md: runs/<job file stem> */
    srun_env();
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &c), 1);
    assert_string_equal(c.run_dir, "runs/qa.v2-4242");
    assert_string_equal(c.checkpoint.dir, "runs/qa.v2-4242/checkpoints");
    /* a requeue (same job id, next restart count) lands in the same place */
    static st_config again;
    setenv("SLURM_RESTART_COUNT", "3", 1);
    assert_int_equal(st_config_load(&again, path, 0, NULL), 0);
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &again), 1);
    assert_string_equal(again.run_dir, c.run_dir);
    /* applying twice changes nothing more */
    assert_int_equal(st_slurm_apply_run_dir(&e, &again), 0);
    assert_string_equal(again.run_dir, "runs/qa.v2-4242");
}

static void test_run_dir_explicit_kept(void **state) {
    (void)state;
    static st_config c;
    char path[512];
    srun_env();
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    write_job("job.yaml", "run_dir: /scratch/me/run1\n", path, sizeof path);
    assert_int_equal(st_config_load(&c, path, 0, NULL), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &c), 0);
    assert_string_equal(c.run_dir, "/scratch/me/run1");
    assert_string_equal(c.checkpoint.dir, "/scratch/me/run1/checkpoints");
    /* an override counts as explicit too */
    char *ov[] = {"run_dir=out/r"};
    write_job("job.yaml", "", path, sizeof path);
    assert_int_equal(st_config_load(&c, path, 1, ov), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &c), 0);
    assert_string_equal(c.run_dir, "out/r");
}

static void test_run_dir_explicit_checkpoint_dir_kept(void **state) {
    (void)state;
    static st_config c;
    char path[512];
    srun_env();
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    write_job("job.yaml", "checkpoint: {dir: /fast/ckpt}\n", path, sizeof path);
    assert_int_equal(st_config_load(&c, path, 0, NULL), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &c), 1);
    assert_string_equal(c.run_dir, "runs/job-4242");
    assert_string_equal(c.checkpoint.dir, "/fast/ckpt");
}

static void test_run_dir_outside_slurm(void **state) {
    (void)state;
    static st_config c;
    char path[512];
    write_job("job.yaml", "", path, sizeof path);
    assert_int_equal(st_config_load(&c, path, 0, NULL), 0);
    setenv("OMPI_COMM_WORLD_RANK", "0", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
    st_slurm_env e;
    assert_int_equal(st_slurm_env_read(&e), 0);
    assert_int_equal(st_slurm_apply_run_dir(&e, &c), 0);
    assert_string_equal(c.run_dir, "runs/job");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_alone, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_srun, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_mpirun_in_allocation, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_mpirun_alone, setup, st_test_dir_teardown),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test_setup_teardown(test_run_dir_default_under_slurm, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_run_dir_explicit_kept, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_run_dir_explicit_checkpoint_dir_kept, setup, st_test_dir_teardown),
        cmocka_unit_test_setup_teardown(test_run_dir_outside_slurm, setup, st_test_dir_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
