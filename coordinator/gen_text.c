/* gen_text.c — text in and out for generation (gen_text.h). This build has no tokenizer module yet, so
 * every model is "without a tokenizer": callers refuse text prompts with one line and write ids only. */
#include "coordinator/gen_text.h"

#include <stddef.h>

#include "common/error.h"

int st_gen_text_supported(void) { return 0; }

int st_gen_text_open(const char *dir, st_gen_text **out) {
    (void)dir;
    *out = NULL;
    return 0;
}

void st_gen_text_free(st_gen_text *t) { (void)t; }

int st_gen_text_encode(const st_gen_text *t, const char *line_json, int chat, int32_t **ids, int *n) {
    (void)t; (void)line_json; (void)chat; (void)ids; (void)n;
    return st_fail(ST_EINVAL, "text prompts need tokenizer support, which this build does not have yet");
}

int st_gen_text_encode_plain(const st_gen_text *t, const char *text, int add_special, int32_t **ids, int *n) {
    (void)t; (void)text; (void)add_special; (void)ids; (void)n;
    return st_fail(ST_EINVAL, "encoding needs tokenizer support, which this build does not have yet");
}

int st_gen_text_decode(const st_gen_text *t, const int32_t *ids, int n, char **text) {
    (void)t; (void)ids; (void)n; (void)text;
    return st_fail(ST_EINVAL, "decoding needs tokenizer support, which this build does not have yet");
}

int32_t st_gen_text_eos(const st_gen_text *t) {
    (void)t;
    return -1;
}
