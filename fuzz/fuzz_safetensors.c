/* fuzz_safetensors.c — libFuzzer target for the safetensors header parser, the sharded-index parser and
 * the config.json reader. The first input byte picks the target (mod 3), the rest is the file content:
 *   0: a .safetensors file: open it, then read every tensor (fp32 conversion or raw bytes) and close;
 *   1: model.safetensors.index.json in a directory that also holds two valid shards: open the directory;
 *   2: config.json text: st_model_config_parse.
 * Build: CC=clang cmake -S . -B build-fuzz -DSHARDTUNE_FUZZ=ON -DSHARDTUNE_CUDA=OFF
 * Run:   build-fuzz/fuzz_safetensors -max_total_time=60 fuzz/corpus_safetensors */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoints/model_dir.h"
#include "checkpoints/safetensors.h"
#include "common/util.h"

static char g_dir[64];

static void put(const char *name, const void *data, size_t len) {
    char p[128];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    if (!f) abort();
    if (len && fwrite(data, 1, len, f) != len) abort();
    fclose(f);
}

static void init_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/st_fuzz_safetensors_XXXXXX");
    if (!mkdtemp(g_dir)) abort();
    float v[6] = {1, 2, 3, 4, 5, 6};
    st_st_write_item a = {"a", v, 2, {2, 3}}, b = {"b.weight", v, 1, {6}};
    char p[128];
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", g_dir);
    if (st_safetensors_write(p, 1, &a, NULL)) abort();
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", g_dir);
    if (st_safetensors_write(p, 1, &b, NULL)) abort();
}

static void read_all(st_safetensors *s) {
    for (int i = 0; i < st_safetensors_count(s); i++) {
        const st_st_tensor *t = st_safetensors_tensor(s, i);
        uint64_t n = st_st_numel(t), bytes = t->end - t->begin;
        /* validated: bytes fit inside the file, so these allocations are bounded by the input size */
        void *buf = malloc(bytes + 8);
        float *f = malloc(n * sizeof(float) + 8);
        if (buf && f) {
            st_safetensors_read_f32(s, t, f, (size_t)n);
            st_safetensors_read_raw(s, t, buf, (size_t)bytes);
            if (st_safetensors_find(s, t->name) != t) abort(); /* names are unique after open */
        }
        free(buf);
        free(f);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_dir[0]) init_dir();
    if (size < 1) return 0;
    int mode = data[0] % 3;
    data++, size--;
    st_safetensors *s = NULL;
    char p[128];
    if (mode == 0) {
        put("fuzz.safetensors", data, size);
        snprintf(p, sizeof p, "%s/fuzz.safetensors", g_dir);
        if (st_safetensors_open(p, &s) == 0) {
            read_all(s);
            st_safetensors_close(s);
        } else if (s) abort(); /* failure leaves *out NULL */
    } else if (mode == 1) {
        put("model.safetensors.index.json", data, size);
        if (st_safetensors_open(g_dir, &s) == 0) {
            read_all(s);
            st_safetensors_close(s);
        }
    } else {
        st_model_config c;
        st_model_config_parse((const char *)data, size, "config.json", &c);
    }
    return 0;
}
