/* fuzz_tokenizer_json.c — libFuzzer target for the tokenizer.json loader and the encode/decode
 * pipelines. Input: tokenizer.json bytes, optionally followed by a NUL byte and a text to encode. Any
 * input must load or fail with a message, never crash; a loaded tokenizer must encode the text (when it
 * is valid UTF-8) into ids that are all in range with offsets inside the text, and decode any id list.
 * Seeds: fuzz/corpus_tokenizer (small trained tokenizers of each kind with a text). */
#include "common/error.h"
#include "text/tokenizer.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    size_t jlen = nul ? (size_t)(nul - data) : size;
    const char *text = nul ? (const char *)nul + 1 : "Hello, world! 123 <|im_end|> 中文 😀";
    size_t tlen = nul ? size - jlen - 1 : strlen(text);
    st_tokenizer *tok = NULL;
    if (st_tokenizer_load_json("fuzz.json", (const char *)data, jlen, &tok) != 0) {
        if (!*st_error()) abort(); /* every failure says why */
        return 0;
    }
    int32_t *ids = NULL;
    uint32_t *off = NULL;
    size_t n = 0;
    for (int special = 0; special < 2; special++) {
        if (st_tokenizer_encode_offsets(tok, text, tlen, special, &ids, &off, &n) == 0) {
            for (size_t i = 0; i < n; i++)
                if (ids[i] < 0 || (size_t)ids[i] >= st_tokenizer_vocab_size(tok) || off[i] > tlen) abort();
            char *back = NULL;
            size_t blen = 0;
            if (st_tokenizer_decode(tok, ids, n, special, &back, &blen) != 0) abort(); /* decode never fails on our ids */
            free(back);
        }
        free(ids), free(off);
    }
    /* arbitrary ids, from the text bytes */
    int32_t raw[64];
    size_t nr = tlen < 64 ? tlen : 64;
    for (size_t i = 0; i < nr; i++) raw[i] = (int32_t)(((const uint8_t *)text)[i] * 7);
    char *back = NULL;
    if (st_tokenizer_decode(tok, raw, nr, nr & 1, &back, NULL) == 0) free(back);
    st_tokenizer_free(tok);
    return 0;
}
