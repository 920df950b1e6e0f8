/* fuzz_chat_template.c — libFuzzer target for the Jinja interpreter. Input: a template, optionally
 * followed by a NUL byte and a JSON messages list. Rendering must succeed or fail with a message naming
 * the problem, never crash, hang or exhaust memory (the interpreter bounds steps, nesting and sizes).
 * Seeds: fuzz/corpus_chat_template (the reference templates). */
#include "common/error.h"
#include "common/json.h"
#include "text/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static const char default_msgs[] =
    "[{\"role\": \"system\", \"content\": \"sys\"}, {\"role\": \"user\", \"content\": \"hi 中文\"},"
    " {\"role\": \"assistant\", \"content\": \"<think>r</think>ok\", \"tool_calls\": [{\"function\": {\"name\": \"f\","
    " \"arguments\": {\"a\": 1}}}]}, {\"role\": \"tool\", \"content\": \"x\"}]";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    size_t tlen = nul ? (size_t)(nul - data) : size;
    char *tpl = malloc(tlen + 1);
    if (!tpl) return 0;
    memcpy(tpl, data, tlen);
    tpl[tlen] = 0;
    st_json *msgs = NULL;
    if (nul) {
        if (st_json_parse((const char *)nul + 1, size - tlen - 1, &msgs) != 0) msgs = NULL;
    }
    if (!msgs && st_json_parse(default_msgs, strlen(default_msgs), &msgs) != 0) abort();
    for (int agp = 0; agp < 2; agp++) {
        st_chat_opts o = {"<s>", "</s>", agp, NULL};
        char *out = NULL;
        if (st_chat_render(tpl, msgs, &o, &out) == 0) free(out);
        else if (!*st_error()) abort();
    }
    st_json_free(msgs);
    free(tpl);
    return 0;
}
