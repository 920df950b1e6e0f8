/* gen_text.c — text in and out for generation (gen_text.h), on the text/ module's tokenizer.json and
 * chat-template support. */
#include "coordinator/gen_text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"
#include "text/tokenizer.h"

struct st_gen_text {
    st_tokenizer *tok;
    int32_t eos;
};

int st_gen_text_open(const char *dir, st_gen_text **out) {
    *out = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    FILE *probe = fopen(path, "rb");
    if (!probe) return 0; /* no tokenizer: ids only */
    fclose(probe);
    st_gen_text *t = calloc(1, sizeof *t);
    if (!t) return st_fail(ST_ENOMEM, "out of memory loading %s", path);
    int rc = st_tokenizer_load(dir, &t->tok);
    if (rc) {
        free(t);
        return rc;
    }
    const char *eos = st_tokenizer_eos_token(t->tok);
    t->eos = eos ? st_tokenizer_token_id(t->tok, eos) : -1;
    *out = t;
    return 0;
}

void st_gen_text_free(st_gen_text *t) {
    if (!t) return;
    st_tokenizer_free(t->tok);
    free(t);
}

int st_gen_text_encode_plain(const st_gen_text *t, const char *text, int add_special, int32_t **ids, int *n) {
    size_t len = 0;
    int rc = st_tokenizer_encode(t->tok, text, strlen(text), add_special, ids, &len);
    if (rc) return rc;
    if (len == 0) return st_fail(ST_EINVAL, "the prompt encodes to no tokens");
    *n = (int)len;
    return 0;
}

/* A chat: the template with the generation prompt, then encoded without adding special tokens again
 * (transformers' apply_chat_template(tokenize=True)). */
static int encode_chat(const st_gen_text *t, const st_json *messages, int32_t **ids, int *n) {
    const char *tmpl = st_tokenizer_chat_template(t->tok);
    if (!tmpl) return st_fail(ST_EINVAL, "the model has no chat template (tokenizer_config.json chat_template or "
                                         "chat_template.jinja)");
    st_chat_opts o;
    memset(&o, 0, sizeof o);
    o.bos_token = st_tokenizer_bos_token(t->tok);
    o.eos_token = st_tokenizer_eos_token(t->tok);
    o.add_generation_prompt = 1;
    char *text = NULL;
    int rc = st_chat_render(tmpl, messages, &o, &text);
    if (!rc) rc = st_gen_text_encode_plain(t, text, 0, ids, n);
    free(text);
    return rc;
}

int st_gen_text_encode(const st_gen_text *t, const char *line_json, int chat, int32_t **ids, int *n) {
    st_json *v = NULL;
    int rc = st_json_parse(line_json, strlen(line_json), &v);
    if (rc) return rc;
    const st_json *msgs = st_json_get(v, "messages");
    const char *prompt = st_json_get_string(v, "prompt", NULL);
    if (msgs) {
        rc = encode_chat(t, msgs, ids, n);
    } else if (prompt && chat) { /* one user message */
        st_strbuf b = {0};
        st_strbuf_printf(&b, "[{\"role\": \"user\", \"content\": ");
        st_strbuf_json_string(&b, prompt);
        st_strbuf_printf(&b, "}]");
        st_json *m = NULL;
        rc = b.failed ? st_fail(ST_ENOMEM, "out of memory") : st_json_parse(b.data, b.len, &m);
        if (!rc) rc = encode_chat(t, m, ids, n);
        st_json_free(m);
        st_strbuf_free(&b);
    } else if (prompt) {
        rc = st_gen_text_encode_plain(t, prompt, 1, ids, n);
    } else {
        rc = st_fail(ST_EFORMAT, "no \"prompt\" or \"messages\"");
    }
    st_json_free(v);
    return rc;
}

int st_gen_text_decode(const st_gen_text *t, const int32_t *ids, int n, char **text) {
    size_t len = 0;
    return st_tokenizer_decode(t->tok, ids, (size_t)n, 1, text, &len);
}

int32_t st_gen_text_eos(const st_gen_text *t) { return t ? t->eos : -1; }
