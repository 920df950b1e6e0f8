/* sft.c — text examples to tokens + loss masks (see sft.h). */
#include "text/sft.h"

#include "common/error.h"
#include "common/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int st_sft_format_from_name(const char *n) {
    static const char *const names[] = {"auto", "chat", "alpaca", "prompt", "text"};
    for (int i = 0; i < 5; i++) if (!strcmp(n, names[i])) return i;
    return -1;
}

int st_sft_train_on_from_name(const char *n) {
    if (!strcmp(n, "all")) return ST_TRAIN_ALL;
    if (!strcmp(n, "assistant")) return ST_TRAIN_ASSISTANT;
    if (!strcmp(n, "last")) return ST_TRAIN_LAST;
    return -1;
}

void st_sft_example_free(st_sft_example *ex) {
    free(ex->ids);
    free(ex->mask);
    memset(ex, 0, sizeof *ex);
}

/* ---- building message lists as JSON (the chat template reads st_json) ---- */

static st_json *jnew(st_json_type t) {
    st_json *j = calloc(1, sizeof *j);
    if (j) j->type = t;
    return j;
}

static st_json *jstr(const char *s) {
    st_json *j = jnew(ST_JSON_STRING);
    if (j && !(j->string = strdup(s))) { free(j); return NULL; }
    return j;
}

static int jpush(st_json *arr, const char *key, st_json *v) {
    if (!v) return -1;
    st_json **items = realloc(arr->items, (arr->count + 1) * sizeof *items);
    if (!items) { st_json_free(v); return -1; }
    arr->items = items;
    if (arr->type == ST_JSON_OBJECT) {
        char **keys = realloc(arr->keys, (arr->count + 1) * sizeof *keys);
        if (!keys) { st_json_free(v); return -1; }
        arr->keys = keys;
        if (!(keys[arr->count] = strdup(key))) { st_json_free(v); return -1; }
    }
    arr->items[arr->count++] = v;
    return 0;
}

/* Deep copy of a JSON value. */
static st_json *jcopy(const st_json *v) {
    st_json *c = jnew(v->type);
    if (!c) return NULL;
    c->boolean = v->boolean, c->number = v->number, c->is_integer = v->is_integer, c->integer = v->integer;
    if (v->string && !(c->string = strdup(v->string))) { free(c); return NULL; }
    for (size_t i = 0; i < v->count; i++)
        if (jpush(c, v->keys ? v->keys[i] : NULL, jcopy(v->items[i])) < 0) { st_json_free(c); return NULL; }
    return c;
}

static int add_message(st_json *msgs, const char *role, const char *content) {
    st_json *m = jnew(ST_JSON_OBJECT);
    if (!m || jpush(m, "role", jstr(role)) < 0 || jpush(m, "content", jstr(content)) < 0 || jpush(msgs, NULL, m) < 0) {
        st_json_free(m);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    return 0;
}

static const char *sharegpt_role(const char *from) {
    static const char *const map[][2] = {{"human", "user"}, {"user", "user"}, {"gpt", "assistant"},
                                         {"assistant", "assistant"}, {"bot", "assistant"}, {"model", "assistant"},
                                         {"system", "system"}, {"tool", "tool"}, {"observation", "tool"},
                                         {"function_response", "tool"}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) if (!strcmp(from, map[i][0])) return map[i][1];
    return NULL;
}

/* Checks a "messages" list: objects with a string role and a content that is a string, null or a list. */
static int check_messages(const st_json *m, const char *key) {
    if (!m || m->type != ST_JSON_ARRAY) return st_fail(ST_EINVAL, "\"%s\" is not a list", key);
    if (!m->count) return st_fail(ST_EINVAL, "\"%s\" is empty", key);
    for (size_t i = 0; i < m->count; i++) {
        const st_json *x = m->items[i];
        if (x->type != ST_JSON_OBJECT) return st_fail(ST_EINVAL, "%s[%zu] is not an object", key, i);
        const st_json *r = st_json_get(x, "role"), *c = st_json_get(x, "content");
        if (!r || r->type != ST_JSON_STRING) return st_fail(ST_EINVAL, "%s[%zu] has no string \"role\"", key, i);
        if (c && c->type != ST_JSON_STRING && c->type != ST_JSON_NULL && c->type != ST_JSON_ARRAY)
            return st_fail(ST_EINVAL, "%s[%zu].content is neither a string nor a list", key, i);
        if (!c && !st_json_get(x, "tool_calls")) return st_fail(ST_EINVAL, "%s[%zu] has no \"content\"", key, i);
    }
    return 0;
}

static const char *str_field(const st_json *row, const char *key, int required, int *rc) {
    const st_json *v = st_json_get(row, key);
    if (!v || v->type == ST_JSON_NULL) {
        if (required) *rc = st_fail(ST_EINVAL, "missing \"%s\"", key);
        return NULL;
    }
    if (v->type != ST_JSON_STRING) { *rc = st_fail(ST_EINVAL, "\"%s\" is not a string", key); return NULL; }
    return v->string;
}

static int detect(const st_json *row) {
    if (st_json_get(row, "messages") || st_json_get(row, "conversations")) return ST_SFT_CHAT;
    if (st_json_get(row, "instruction")) return ST_SFT_ALPACA;
    if (st_json_get(row, "prompt") || st_json_get(row, "completion")) return ST_SFT_PROMPT;
    if (st_json_get(row, "text")) return ST_SFT_TEXT;
    return -1;
}

/* The example as a message list (chat, alpaca and prompt/completion), in *msgs (caller frees). */
static int to_messages(const st_json *row, int format, st_json **msgs) {
    st_json *m = jnew(ST_JSON_ARRAY);
    if (!m) return st_fail(ST_ENOMEM, "out of memory");
    int rc = 0;
    *msgs = m;
    if (format == ST_SFT_CHAT) {
        const st_json *src = st_json_get(row, "messages");
        if (src) {
            if ((rc = check_messages(src, "messages")) < 0) return rc;
            for (size_t i = 0; i < src->count; i++)
                if (jpush(m, NULL, jcopy(src->items[i])) < 0) return st_fail(ST_ENOMEM, "out of memory");
            return 0;
        }
        src = st_json_get(row, "conversations");
        if (!src) return st_fail(ST_EINVAL, "a chat row needs \"messages\" (or ShareGPT's \"conversations\")");
        if (src->type != ST_JSON_ARRAY || !src->count) return st_fail(ST_EINVAL, "\"conversations\" is not a non-empty list");
        for (size_t i = 0; i < src->count; i++) {
            const char *from = st_json_get_string(src->items[i], "from", NULL), *value = st_json_get_string(src->items[i], "value", NULL);
            if (!from || !value) return st_fail(ST_EINVAL, "conversations[%zu] needs string \"from\" and \"value\"", i);
            const char *role = sharegpt_role(from);
            if (!role) return st_fail(ST_EINVAL, "conversations[%zu]: unknown \"from\": \"%s\"", i, from);
            if ((rc = add_message(m, role, value)) < 0) return rc;
        }
        return 0;
    }
    if (format == ST_SFT_ALPACA) {
        const char *ins = str_field(row, "instruction", 1, &rc), *in = str_field(row, "input", 0, &rc), *out = str_field(row, "output", 1, &rc);
        if (rc < 0) return rc;
        st_strbuf u = {0};
        st_strbuf_append(&u, ins, strlen(ins));
        if (in && *in) { st_strbuf_append(&u, "\n\n", 2); st_strbuf_append(&u, in, strlen(in)); }
        if (u.failed) return st_fail(ST_ENOMEM, "out of memory");
        rc = add_message(m, "user", u.data ? u.data : "");
        st_strbuf_free(&u);
        return rc < 0 ? rc : add_message(m, "assistant", out);
    }
    /* prompt / completion: strings, or message lists (conversational prompt-completion) */
    const st_json *p = st_json_get(row, "prompt"), *c = st_json_get(row, "completion");
    if (!p || !c) return st_fail(ST_EINVAL, "prompt/completion rows need both \"prompt\" and \"completion\"");
    const st_json *parts[2] = {p, c};
    for (int k = 0; k < 2; k++) {
        const char *key = k ? "completion" : "prompt";
        if (parts[k]->type == ST_JSON_STRING) rc = add_message(m, k ? "assistant" : "user", parts[k]->string);
        else if (parts[k]->type == ST_JSON_ARRAY) {
            if ((rc = check_messages(parts[k], key)) < 0) return rc;
            for (size_t i = 0; i < parts[k]->count && rc == 0; i++)
                if (jpush(m, NULL, jcopy(parts[k]->items[i])) < 0) rc = st_fail(ST_ENOMEM, "out of memory");
        } else rc = st_fail(ST_EINVAL, "\"%s\" is neither a string nor a message list", key);
        if (rc < 0) return rc;
    }
    return 0;
}

/* ---- rendering and masks ---- */

typedef struct { size_t start, end; } span;

static int render(const st_tokenizer *tok, const char *tpl, const st_json *msgs, size_t n, int agp, char **out) {
    st_json view = *msgs;
    view.count = n; /* a prefix of the conversation, sharing the items */
    st_chat_opts o = {st_tokenizer_bos_token(tok), st_tokenizer_eos_token(tok), agp, NULL};
    return st_chat_render(tpl, &view, &o, out);
}

static int is_end(const st_sft_opts *o, int32_t id) {
    for (size_t i = 0; i < o->n_end; i++) if (o->end_ids[i] == id) return 1;
    return 0;
}

/* Marks the tokens that start inside each span, up to and including the span's first end token. */
static void mark(st_sft_example *ex, const uint32_t *off, const st_sft_opts *o, const span *sp, size_t nsp) {
    for (size_t s = 0; s < nsp; s++) {
        int ended = 0;
        for (size_t i = 0; i < ex->n; i++) {
            if (off[i] < sp[s].start || off[i] >= sp[s].end || ended) continue;
            ex->mask[i] = 1;
            if (is_end(o, ex->ids[i])) ended = 1;
        }
    }
}

static int tokenize_into(const st_tokenizer *tok, const char *text, int add_special, st_sft_example *ex, uint32_t **off) {
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = st_tokenizer_encode_offsets(tok, text, strlen(text), add_special, &ids, off, &n);
    if (rc < 0) return rc;
    ex->ids = ids, ex->n = n;
    ex->mask = calloc(n + 1, 1);
    if (!ex->mask) return st_fail(ST_ENOMEM, "out of memory");
    return 0;
}

/* A doubled BOS at the start (template BOS + a BOS in the text) is dropped. */
static void drop_double_bos(const st_tokenizer *tok, st_sft_example *ex, uint32_t *off) {
    const char *bos = st_tokenizer_bos_token(tok);
    int32_t b = bos ? st_tokenizer_token_id(tok, bos) : -1;
    if (b < 0 || ex->n < 2 || ex->ids[0] != b || ex->ids[1] != b) return;
    memmove(ex->ids, ex->ids + 1, (ex->n - 1) * sizeof *ex->ids);
    memmove(ex->mask, ex->mask + 1, ex->n - 1);
    if (off) memmove(off, off + 1, (ex->n - 1) * sizeof *off);
    ex->n--;
    ex->bos_dropped = 1;
}

static int chat_example(const st_tokenizer *tok, const st_sft_opts *o, const st_json *msgs, int train_on, st_sft_example *ex) {
    char *full = NULL;
    int rc = render(tok, o->template_src, msgs, msgs->count, 0, &full);
    if (rc < 0) return rc;
    span *sp = calloc(msgs->count + 1, sizeof *sp);
    size_t nsp = 0;
    if (!sp) { free(full); return st_fail(ST_ENOMEM, "out of memory"); }
    size_t last = msgs->count;
    for (size_t i = 0; i < msgs->count; i++)
        if (!strcmp(st_json_get_string(msgs->items[i], "role", ""), "assistant")) last = i;
    if (train_on != ST_TRAIN_ALL) {
        if (last == msgs->count) rc = st_fail(ST_EINVAL, "no assistant message to train on (use --train-on all to train on everything)");
        for (size_t i = 0; rc == 0 && i < msgs->count; i++) {
            if (strcmp(st_json_get_string(msgs->items[i], "role", ""), "assistant") || (train_on == ST_TRAIN_LAST && i != last)) continue;
            char *pre = NULL, *upto = NULL;
            rc = render(tok, o->template_src, msgs, i, 1, &pre);
            if (rc == 0) rc = render(tok, o->template_src, msgs, i + 1, 0, &upto);
            if (rc == 0) {
                size_t pl = strlen(pre), ul = strlen(upto);
                if (ul < pl || memcmp(upto, pre, pl) || strncmp(full, upto, ul))
                    rc = st_fail(ST_EINVAL, "the chat template does not render message %zu as a continuation of the ones before "
                                 "(it rewrites earlier turns); --train-on last or all avoid this", i);
                else sp[nsp++] = (span){pl, ul};
            }
            free(pre), free(upto);
        }
    }
    uint32_t *off = NULL;
    if (rc == 0) rc = tokenize_into(tok, full, 0, ex, &off);
    if (rc == 0) {
        drop_double_bos(tok, ex, off);
        if (train_on == ST_TRAIN_ALL) memset(ex->mask, 1, ex->n);
        else mark(ex, off, o, sp, nsp);
    }
    free(off), free(sp), free(full);
    return rc;
}

/* Without a chat template: prompt text then completion text and EOS (alpaca uses the classic Alpaca prompt). */
static int plain_example(const st_tokenizer *tok, const st_sft_opts *o, const char *prompt, const char *completion,
                         int train_on, st_sft_example *ex) {
    st_strbuf all = {0};
    st_strbuf_append(&all, prompt, strlen(prompt));
    size_t start = all.len;
    st_strbuf_append(&all, completion, strlen(completion));
    if (all.failed) return st_fail(ST_ENOMEM, "out of memory");
    const char *bos = st_tokenizer_bos_token(tok);
    int add_special = !(bos && *bos && !strncmp(all.data ? all.data : "", bos, strlen(bos))); /* no double BOS */
    uint32_t *off = NULL;
    int rc = tokenize_into(tok, all.data ? all.data : "", add_special, ex, &off);
    size_t len = all.len;
    st_strbuf_free(&all);
    if (rc < 0) return rc;
    /* the end token closes the document, unless the text already ends with one */
    if (o->n_end && (!ex->n || !is_end(o, ex->ids[ex->n - 1]))) {
        int32_t *ids = realloc(ex->ids, (ex->n + 1) * sizeof *ids);
        uint8_t *mask = ids ? realloc(ex->mask, ex->n + 1) : NULL;
        uint32_t *no = mask ? realloc(off, (ex->n + 1) * sizeof *no) : NULL;
        if (ids) ex->ids = ids;
        if (mask) ex->mask = mask;
        if (!no) { free(off); return st_fail(ST_ENOMEM, "out of memory"); }
        off = no;
        ex->ids[ex->n] = o->end_ids[0], ex->mask[ex->n] = 0, off[ex->n] = (uint32_t)len;
        ex->n++;
    }
    for (size_t i = 0; i < ex->n; i++) ex->mask[i] = train_on == ST_TRAIN_ALL || off[i] >= start;
    free(off);
    return 0;
}

int st_sft_convert(const st_tokenizer *tok, const st_sft_opts *o, const st_json *row, st_sft_example *ex) {
    memset(ex, 0, sizeof *ex);
    if (!row || row->type != ST_JSON_OBJECT) return st_fail(ST_EINVAL, "not a JSON object");
    int format = o->format == ST_SFT_AUTO ? detect(row) : o->format;
    if (format < 0)
        return st_fail(ST_EINVAL, "cannot tell the format: expected \"messages\", \"conversations\", \"instruction\"/\"output\", "
                                  "\"prompt\"/\"completion\" or \"text\"");
    ex->format = format;
    int train_on = o->train_on != ST_TRAIN_DEFAULT ? o->train_on : format == ST_SFT_TEXT ? ST_TRAIN_ALL : ST_TRAIN_ASSISTANT;
    int rc;
    if (format == ST_SFT_TEXT) {
        if (train_on != ST_TRAIN_ALL) return st_fail(ST_EINVAL, "plain \"text\" rows have no assistant part: use --train-on all");
        const char *text = str_field(row, "text", 1, &(int){0});
        if (!text) return st_fail(ST_EINVAL, "missing string \"text\"");
        rc = plain_example(tok, o, "", text, ST_TRAIN_ALL, ex);
    } else if (!o->template_src && format == ST_SFT_CHAT) {
        rc = st_fail(ST_EINVAL, "chat rows need a chat template (the model has none: give --template FILE)");
    } else if (!o->template_src) {
        int r2 = 0;
        const char *p = format == ST_SFT_ALPACA ? str_field(row, "instruction", 1, &r2) : str_field(row, "prompt", 1, &r2);
        const char *in = format == ST_SFT_ALPACA ? str_field(row, "input", 0, &r2) : NULL;
        const char *c = format == ST_SFT_ALPACA ? str_field(row, "output", 1, &r2) : str_field(row, "completion", 1, &r2);
        if (r2 < 0) return r2;
        if (train_on == ST_TRAIN_LAST) train_on = ST_TRAIN_ASSISTANT;
        if (format == ST_SFT_ALPACA) {
            st_strbuf b = {0};
            st_strbuf_printf(&b, "%s\n\n### Instruction:\n%s\n\n", in && *in
                ? "Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request."
                : "Below is an instruction that describes a task. Write a response that appropriately completes the request.", p);
            if (in && *in) st_strbuf_printf(&b, "### Input:\n%s\n\n", in);
            st_strbuf_append(&b, "### Response:\n", 14);
            rc = b.failed ? st_fail(ST_ENOMEM, "out of memory") : plain_example(tok, o, b.data, c, train_on, ex);
            st_strbuf_free(&b);
        } else rc = plain_example(tok, o, p, c, train_on, ex);
    } else {
        st_json *msgs = NULL;
        rc = to_messages(row, format, &msgs);
        if (rc == 0) rc = chat_example(tok, o, msgs, train_on, ex);
        st_json_free(msgs);
    }
    if (rc < 0) { st_sft_example_free(ex); return rc; }
    if (!ex->n) { st_sft_example_free(ex); return st_fail(ST_EINVAL, "the example has no tokens"); }
    return 0;
}

static void add_id(int32_t **ids, size_t *n, int64_t v) {
    if (v < 0 || v > INT32_MAX) return;
    for (size_t i = 0; i < *n; i++) if ((*ids)[i] == v) return;
    int32_t *x = realloc(*ids, (*n + 1) * sizeof *x);
    if (!x) return;
    x[(*n)++] = (int32_t)v;
    *ids = x;
}

static void ids_from_file(const char *path, int32_t **ids, size_t *n) {
    char *data = NULL;
    size_t len = 0;
    if (st_read_file(path, &data, &len) < 0) return;
    st_json *j = NULL;
    if (st_json_parse(data, len, &j) == 0) {
        const st_json *e = st_json_get(j, "eos_token_id");
        if (e && e->is_integer) add_id(ids, n, e->integer);
        else if (e && e->type == ST_JSON_ARRAY)
            for (size_t i = 0; i < e->count; i++) if (e->items[i]->is_integer) add_id(ids, n, e->items[i]->integer);
    }
    st_json_free(j);
    free(data);
}

int st_sft_end_ids(const char *dir, const st_tokenizer *tok, int32_t **ids, size_t *n) {
    *ids = NULL, *n = 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    ids_from_file(path, ids, n);
    if (!*n) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        ids_from_file(path, ids, n);
    }
    const char *eos = st_tokenizer_eos_token(tok);
    if (eos) add_id(ids, n, st_tokenizer_token_id(tok, eos));
    return 0;
}
