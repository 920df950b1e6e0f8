/* test_tmpdir.h — one scratch directory per unit-test program, made by the cmocka group setup and
 * removed by its teardown; st_test_path() names files inside it (rotating static buffers). */
#ifndef ST_TEST_TMPDIR_H
#define ST_TEST_TMPDIR_H

#include <stdio.h>
#include <stdlib.h>

static char st_test_dir[256];

static inline int st_test_dir_setup(void **state) {
    (void)state;
    snprintf(st_test_dir, sizeof st_test_dir, "/tmp/st_test_XXXXXX");
    return mkdtemp(st_test_dir) ? 0 : -1;
}

static inline int st_test_dir_teardown(void **state) {
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", st_test_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static inline const char *st_test_path(const char *name) {
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", st_test_dir, name);
    return buf[k];
}

#endif
