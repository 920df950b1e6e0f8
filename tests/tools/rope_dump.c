/* rope_dump.c — the RoPE tables shardtune builds for a model directory's config.json, for the reference
 * test tests/reference/ref_rope_models.py.
 *
 *   rope_dump --model DIR --seq-len T --out OUT.safetensors
 *
 * OUT gets "inv_freq" [hd/2] (fp32, st_model_rope_inv_freq), "attention_scaling" [1] and the tables the
 * kernels apply, "cos" and "sin" [T, hd/2] (st_model_rope_tables). Exit 1 with the error on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_dir.h"
#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "worker/model.h"

int main(int argc, char **argv) {
    const char *dir = NULL, *out = NULL;
    int T = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--seq-len")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--out")) out = argv[i + 1];
    }
    if (!dir || !out || T < 1) {
        fprintf(stderr, "usage: rope_dump --model DIR --seq-len T --out OUT.safetensors\n");
        return 2;
    }
    st_model_config c;
    int rc = st_model_config_read(dir, &c);
    int half = c.head_dim / 2;
    float *inv = NULL, *cs = NULL, *sn = NULL, att_f = 0;
    double att = 0;
    if (!rc) {
        inv = malloc((size_t)half * sizeof *inv);
        cs = malloc((size_t)T * half * sizeof *cs);
        sn = malloc((size_t)T * half * sizeof *sn);
        if (!inv || !cs || !sn) rc = st_fail(ST_ENOMEM, "out of memory");
    }
    if (!rc) rc = st_model_rope_inv_freq(&c, T, inv, &att);
    if (!rc) rc = st_model_rope_tables(&c, T, cs, sn);
    if (!rc) {
        att_f = (float)att;
        st_st_write_item items[4] = {
            {"inv_freq", inv, 1, {half}}, {"attention_scaling", &att_f, 1, {1}},
            {"cos", cs, 2, {T, half}}, {"sin", sn, 2, {T, half}}};
        rc = st_safetensors_write(out, 4, items, NULL);
    }
    free(inv);
    free(cs);
    free(sn);
    if (rc) {
        fprintf(stderr, "rope_dump: %s\n", st_error());
        return 1;
    }
    return 0;
}
