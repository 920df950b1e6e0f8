/* dataset_check.c — test helper: loads each dataset file given with st_dataset_load and prints
 * "ok docs=D tokens=N masked=M vocab=V eos=E checksum=HEX" or "error: MESSAGE" (exit 1). Used by
 * tests/reference/test_dataset_h5py.py to check that files written by h5py are read correctly. */
#include "common/error.h"
#include "worker/dataset.h"

#include <inttypes.h>
#include <stdio.h>

int main(int argc, char **argv) {
    int status = 0;
    for (int i = 1; i < argc; i++) {
        st_dataset ds;
        if (st_dataset_load(argv[i], &ds) != 0) {
            printf("error: %s\n", st_error());
            status = 1;
            continue;
        }
        printf("ok docs=%" PRIu64 " tokens=%" PRIu64 " masked=%" PRIu64 " vocab=%" PRId64 " eos=%" PRId64
               " checksum=%016" PRIx64 "\n",
               ds.n_docs, ds.n_tokens, st_dataset_masked_tokens(&ds), ds.vocab_size, ds.eos_id, ds.checksum);
        st_dataset_free(&ds);
    }
    return status;
}
