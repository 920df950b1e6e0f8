/* fuzz_dataset_jsonl.c — libFuzzer target for the JSONL packer (`data pack --jsonl`): any bytes must
 * give a valid in-memory dataset or a message naming a line, never a crash. The first input byte
 * picks the options (vocab given or inferred, EOS or not) so all paths are explored. */
#include "common/error.h"
#include "worker/dataset.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int64_t vocab = (data[0] & 1) ? 1000 : 0;
    int64_t eos = (data[0] & 2) ? 7 : -1;
    st_dataset ds;
    int rc = st_dataset_pack_jsonl_buffer("fuzz.jsonl", (const char *)data + 1, size - 1, vocab, eos, &ds);
    if (rc == 0) {
        if (st_dataset_validate(&ds, "fuzz") != 0) abort();
        if (vocab > 0 && ds.vocab_size != vocab) abort();
        st_dataset_free(&ds);
    } else if (!strstr(st_error(), "fuzz.jsonl")) {
        abort(); /* every error names the input */
    }
    return 0;
}
