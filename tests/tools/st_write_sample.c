/* st_write_sample.c — test helper for tests/reference/test_safetensors_numpy.py.
 *
 *   st_write_sample write FILE            writes the sample tensors (below) to one .safetensors file
 *   st_write_sample sharded DIR MAXBYTES  writes them with st_safetensors_write_sharded
 *   st_write_sample dump PATH             reads a file/dir with our reader and prints, per tensor in file
 *                                         order: name TAB dtype TAB d0,d1,.. TAB fp32 bit patterns (hex)
 *
 * Sample tensors (the python test rebuilds them with numpy):
 *   "arange"                  [3,4]  i*0.5 - 2
 *   "h.0.attn.c_attn.weight"  [4,6]  (float)i / 3
 *   "scalar"                  []     42
 *   "vec"                     [5]    -(i*i)
 *   "model.layers.0.mlp.up_proj.weight" [16,8]  (i % 7) * 0.25 - 1 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/safetensors.h"
#include "common/error.h"

static float g_arange[12], g_third[24], g_scalar = 42, g_vec[5], g_up[128];

static void make_items(st_st_write_item items[5]) {
    for (int i = 0; i < 12; i++) g_arange[i] = (float)i * 0.5f - 2.0f;
    for (int i = 0; i < 24; i++) g_third[i] = (float)i / 3.0f;
    for (int i = 0; i < 5; i++) g_vec[i] = -(float)(i * i);
    for (int i = 0; i < 128; i++) g_up[i] = (float)(i % 7) * 0.25f - 1.0f;
    st_st_write_item it[5] = {
        {"arange", g_arange, 2, {3, 4}},
        {"h.0.attn.c_attn.weight", g_third, 2, {4, 6}},
        {"scalar", &g_scalar, 0, {0}},
        {"vec", g_vec, 1, {5}},
        {"model.layers.0.mlp.up_proj.weight", g_up, 2, {16, 8}},
    };
    memcpy(items, it, sizeof it);
}

static int dump(const char *path) {
    st_safetensors *s = NULL;
    if (st_safetensors_open(path, &s) != 0) {
        fprintf(stderr, "error: %s\n", st_error());
        return 1;
    }
    for (int i = 0; i < st_safetensors_count(s); i++) {
        const st_st_tensor *t = st_safetensors_tensor(s, i);
        printf("%s\t%s\t", t->name, st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) printf(d ? ",%" PRId64 : "%" PRId64, t->shape[d]);
        printf("\t");
        size_t n = (size_t)st_st_numel(t);
        float *v = malloc(n * sizeof(float) + 4);
        if (!v) return 1;
        if (st_safetensors_read_f32(s, t, v, n) == 0) {
            for (size_t k = 0; k < n; k++) {
                uint32_t u;
                memcpy(&u, &v[k], 4);
                printf(k ? " %08x" : "%08x", u);
            }
        } else {
            printf("unsupported");
        }
        printf("\n");
        free(v);
    }
    st_safetensors_close(s);
    return 0;
}

int main(int argc, char **argv) {
    st_st_write_item items[5];
    make_items(items);
    int rc;
    if (argc == 3 && strcmp(argv[1], "write") == 0)
        rc = st_safetensors_write(argv[2], 5, items, "{\"format\":\"pt\",\"producer\":\"shardtune\"}");
    else if (argc == 4 && strcmp(argv[1], "sharded") == 0)
        rc = st_safetensors_write_sharded(argv[2], 5, items, strtoull(argv[3], NULL, 10));
    else if (argc == 3 && strcmp(argv[1], "dump") == 0)
        return dump(argv[2]);
    else {
        fprintf(stderr, "usage: st_write_sample write FILE | sharded DIR MAXBYTES | dump PATH\n");
        return 2;
    }
    if (rc) fprintf(stderr, "error: %s\n", st_error());
    return rc ? 1 : 0;
}
