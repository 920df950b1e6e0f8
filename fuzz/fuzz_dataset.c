/* fuzz_dataset.c — libFuzzer target: the input bytes are a dataset file; st_dataset_load must
 * either accept it (and then its invariants hold) or refuse it with a message, never crash.
 * Build: CC=clang cmake -S . -B build-fuzz -DSHARDTUNE_FUZZ=ON -DSHARDTUNE_CUDA=OFF */
#include "common/error.h"
#include "worker/dataset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/st_fuzz_dataset_%d.h5", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    st_dataset ds;
    if (st_dataset_load(path, &ds) == 0) {
        /* Accepted: the invariants the loader relies on must hold. */
        if (ds.doc_offsets[0] != 0 || ds.doc_offsets[ds.n_docs] != ds.n_tokens) abort();
        for (uint64_t i = 0; i < ds.n_tokens; i++)
            if ((int64_t)ds.tokens[i] >= ds.vocab_size || ds.loss_mask[i] > 1) abort();
        st_dataset_free(&ds);
    } else if (st_error()[0] == 0) {
        abort(); /* a refusal must say why */
    }
    unlink(path);
    return 0;
}
