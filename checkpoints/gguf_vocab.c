/* gguf_vocab.c — tokenizer.* GGUF metadata from a Hugging Face tokenizer.json (see docs/compress.md).
 *
 * Only BPE tokenizers are exported. Byte-level BPE (GPT-2, Llama 3, Qwen2) becomes tokenizer.ggml.model
 * "gpt2" with its merges and a pre-tokenizer name recognised from the split regex; SentencePiece-style
 * BPE (byte_fallback / Metaspace: Llama 2, Mistral) becomes "llama", whose merge priority llama.cpp reads
 * from per-token scores: the token a merge of rank r produces scores -r. The token list is padded to the
 * model's vocab_size with "[PAD<id>]" entries of type UNUSED, like llama.cpp's converter. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/gguf_internal.h"
#include "common/error.h"
#include "common/util.h"

enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5, TOK_BYTE = 6 };

typedef struct {
    int n;            /* = model vocab size */
    char **text;      /* text[id] (owned) */
    int *type;
    float *scores;
    int *slot;        /* open-addressing hash: token text -> id (-1 empty), cap entries */
    size_t cap;
} vocab;

static void vocab_free(vocab *v) {
    for (int i = 0; v->text && i < v->n; i++) free(v->text[i]);
    free(v->text);
    free(v->type);
    free(v->scores);
    free(v->slot);
}

static size_t hslot(const vocab *v, const char *s, size_t len) {
    return (size_t)(st_fnv1a(ST_FNV_INIT, s, len) & (v->cap - 1));
}

static int vocab_find(const vocab *v, const char *s, size_t len) {
    for (size_t h = hslot(v, s, len);; h = (h + 1) & (v->cap - 1)) {
        int id = v->slot[h];
        if (id < 0) return -1;
        if (strlen(v->text[id]) == len && memcmp(v->text[id], s, len) == 0) return id;
    }
}

static int vocab_set(vocab *v, int id, const char *s, const char *src) {
    if (id < 0 || id >= v->n)
        return st_fail(ST_ECONFIG, "%s: token '%.40s' has id %d outside the model's vocab_size %d", src, s, id, v->n);
    if (v->text[id] && strcmp(v->text[id], s) != 0)
        return st_fail(ST_ECONFIG, "%s: token id %d is both '%.40s' and '%.40s'", src, id, v->text[id], s);
    if (v->text[id]) return 0;
    if (!(v->text[id] = strdup(s))) return st_fail(ST_ENOMEM, "out of memory");
    return 0;
}

static int vocab_index(vocab *v) {
    for (v->cap = 16; v->cap < 2 * (size_t)v->n; v->cap *= 2) {}
    if (!(v->slot = malloc(v->cap * sizeof(int)))) return st_fail(ST_ENOMEM, "out of memory");
    memset(v->slot, 0xff, v->cap * sizeof(int));
    for (int id = 0; id < v->n; id++) {
        size_t len = strlen(v->text[id]);
        if (vocab_find(v, v->text[id], len) >= 0) continue; /* a duplicate text keeps its first id */
        size_t h = hslot(v, v->text[id], len);
        while (v->slot[h] >= 0) h = (h + 1) & (v->cap - 1);
        v->slot[h] = id;
    }
    return 0;
}

/* A special-token entry of tokenizer_config.json: "text" or {"content": "text"}. */
static const char *token_text(const st_json *j) {
    if (j && j->type == ST_JSON_OBJECT) j = st_json_get(j, "content");
    return j && j->type == ST_JSON_STRING ? j->string : NULL;
}

static int is_byte_token(const char *s) {
    return strlen(s) == 6 && strncmp(s, "<0x", 3) == 0 && s[5] == '>';
}

/* Does any object under j have "type": t? (pre_tokenizer / normalizer Sequences nest their parts.) */
static const st_json *find_typed(const st_json *j, const char *t) {
    if (!j) return NULL;
    if (j->type == ST_JSON_OBJECT) {
        const char *ty = st_json_get_string(j, "type", NULL);
        if (ty && strcmp(ty, t) == 0) return j;
    }
    if (j->type == ST_JSON_OBJECT || j->type == ST_JSON_ARRAY)
        for (size_t i = 0; i < j->count; i++) {
            const st_json *r = find_typed(j->items[i], t);
            if (r) return r;
        }
    return NULL;
}

/* llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its split regex; NULL when the
 * pattern is none of the recognised ones (*pattern then names it, or "(none)"): guessing `default` would
 * make llama.cpp split text differently from `tokenizers` without a word, so the caller errors instead. */
static const char *pre_name(const st_json *root, const char **pattern) {
    const st_json *pre = st_json_get(root, "pre_tokenizer");
    const st_json *split = find_typed(pre, "Split");
    const char *re = split ? st_json_get_string(st_json_get(split, "pattern"), "Regex", NULL) : NULL;
    if (!re && split) re = st_json_get_string(st_json_get(split, "pattern"), "String", NULL);
    *pattern = re ? re : "(none)";
    if (re && strstr(re, "\\p{N}{1,3}")) return "llama-bpe";
    if (re && strstr(re, "\\p{N}| ?")) return "qwen2";
    const st_json *bl = find_typed(pre, "ByteLevel");
    if (!split && bl) {
        const st_json *ur = st_json_get(bl, "use_regex");
        if (!ur || ur->type != ST_JSON_BOOL || ur->boolean) return "gpt-2";
        *pattern = "(ByteLevel without its regex)";
    }
    return NULL;
}

static int is_spm_style(const st_json *root, const st_json *model) {
    const st_json *bf = st_json_get(model, "byte_fallback");
    if (bf && bf->type == ST_JSON_BOOL && bf->boolean) return 1;
    if (find_typed(st_json_get(root, "pre_tokenizer"), "Metaspace")) return 1;
    return find_typed(st_json_get(root, "normalizer"), "Prepend") != NULL;
}

/* "a b" from a merges entry (a string, or a two-string array in newer tokenizers). */
static int merge_text(const st_json *e, st_strbuf *out) {
    out->len = 0;
    if (e->type == ST_JSON_STRING) st_strbuf_append(out, e->string, strlen(e->string));
    else if (e->type == ST_JSON_ARRAY && e->count == 2 && e->items[0]->type == ST_JSON_STRING &&
             e->items[1]->type == ST_JSON_STRING)
        st_strbuf_printf(out, "%s %s", e->items[0]->string, e->items[1]->string);
    else return -1;
    st_strbuf_append(out, "", 0);
    return out->failed ? -1 : 0;
}

static int load_json(const char *dir, const char *file, int required, st_json **out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    *out = NULL;
    char *text;
    size_t len;
    FILE *probe = fopen(path, "rb");
    if (!probe) return required ? st_fail(ST_EIO, "%s: not found", path) : 0;
    fclose(probe);
    int rc = st_read_file(path, &text, &len);
    if (rc) return rc;
    rc = st_json_parse(text, len, out);
    free(text);
    return rc ? st_fail_context(rc, "%s", path) : 0;
}

static int fill_vocab(vocab *v, const st_json *root, const st_json *model, int spm, const char *src) {
    const st_json *tv = st_json_get(model, "vocab");
    if (!tv || tv->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "%s: model.vocab is missing", src);
    int rc = 0;
    for (size_t i = 0; i < tv->count && !rc; i++) {
        const st_json *id = tv->items[i];
        if (id->type != ST_JSON_NUMBER || !id->is_integer) return st_fail(ST_EFORMAT, "%s: bad vocab id", src);
        rc = vocab_set(v, (int)id->integer, tv->keys[i], src);
        if (!rc) v->type[id->integer] = spm && is_byte_token(tv->keys[i]) ? TOK_BYTE : TOK_NORMAL;
    }
    const st_json *added = st_json_get(root, "added_tokens");
    for (size_t i = 0; added && added->type == ST_JSON_ARRAY && i < added->count && !rc; i++) {
        const st_json *a = added->items[i];
        int ok = 1;
        int64_t id = st_json_get_int(a, "id", -1, &ok);
        const char *content = st_json_get_string(a, "content", NULL);
        if (!ok || !content) return st_fail(ST_EFORMAT, "%s: added_tokens[%zu] needs id and content", src, i);
        const st_json *sp = st_json_get(a, "special");
        if (id >= 0 && id < v->n && v->text[id] && strcmp(v->text[id], content) == 0) {} /* also in vocab */
        else rc = vocab_set(v, (int)id, content, src);
        if (!rc) v->type[id] = sp && sp->type == ST_JSON_BOOL && sp->boolean ? TOK_CONTROL : TOK_USER;
    }
    for (int id = 0; id < v->n && !rc; id++)
        if (!v->text[id]) {
            char pad[32];
            snprintf(pad, sizeof pad, "[PAD%d]", id);
            rc = vocab_set(v, id, pad, src);
            v->type[id] = TOK_UNUSED;
        }
    return rc ? rc : vocab_index(v);
}

/* Special token id: config.json's when set, else tokenizer_config.json's token looked up in the vocab. */
static int special_id(const vocab *v, int cfg_id, const st_json *tcfg, const char *key) {
    if (cfg_id >= 0 && cfg_id < v->n) return cfg_id;
    const char *t = token_text(st_json_get(tcfg, key));
    return t ? vocab_find(v, t, strlen(t)) : -1;
}

static int add_chat_template(st_gguf_kv *kv, const char *dir, const st_json *tcfg) {
    const char *tpl = st_json_get_string(tcfg, "chat_template", NULL);
    if (tpl) {
        st_gguf_kv_str(kv, "tokenizer.chat_template", tpl);
        return 0;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    FILE *probe = fopen(path, "rb");
    if (!probe) return 0;
    fclose(probe);
    char *text;
    size_t len;
    int rc = st_read_file(path, &text, &len);
    if (rc) return rc;
    st_gguf_kv_str(kv, "tokenizer.chat_template", text);
    free(text);
    return 0;
}

static void add_vocab_arrays(st_gguf_kv *kv, const vocab *v, int spm) {
    st_gguf_kv_array(kv, "tokenizer.ggml.tokens", GGUF_STR, (uint64_t)v->n);
    for (int i = 0; i < v->n; i++) st_gguf_put_str(&kv->b, v->text[i], strlen(v->text[i]));
    if (spm) {
        st_gguf_kv_array(kv, "tokenizer.ggml.scores", GGUF_F32, (uint64_t)v->n);
        st_strbuf_append(&kv->b, (const char *)v->scores, (size_t)v->n * sizeof(float));
    }
    st_gguf_kv_array(kv, "tokenizer.ggml.token_type", GGUF_I32, (uint64_t)v->n);
    for (int i = 0; i < v->n; i++) st_gguf_put_u32(&kv->b, (uint32_t)v->type[i]);
}

/* Merges: written as "a b" strings (gpt2), or turned into scores (llama: the product of rank r scores -r). */
static int add_merges(st_gguf_kv *kv, vocab *v, const st_json *merges, int spm, const char *src) {
    size_t n = merges && merges->type == ST_JSON_ARRAY ? merges->count : 0;
    st_strbuf m = {0};
    if (!spm) st_gguf_kv_array(kv, "tokenizer.ggml.merges", GGUF_STR, (uint64_t)n);
    unsigned char *scored = spm ? calloc((size_t)v->n, 1) : NULL;
    if (spm && !scored) return st_fail(ST_ENOMEM, "out of memory");
    int rc = 0;
    for (size_t r = 0; r < n && !rc; r++) {
        if (merge_text(merges->items[r], &m)) {
            rc = st_fail(ST_EFORMAT, "%s: model.merges[%zu] is not a merge pair", src, r);
            break;
        }
        if (!spm) {
            st_gguf_put_str(&kv->b, m.data, m.len);
            continue;
        }
        char *sp = strchr(m.data, ' ');
        if (!sp) continue;
        memmove(sp, sp + 1, strlen(sp + 1) + 1); /* "a b" -> "ab", the merged token */
        int id = vocab_find(v, m.data, strlen(m.data));
        if (id >= 0 && !scored[id]) {
            v->scores[id] = -(float)r;
            scored[id] = 1;
        }
    }
    free(scored);
    st_strbuf_free(&m);
    return rc;
}

int st_gguf_add_tokenizer(st_gguf_kv *kv, const char *dir, const char *pre, const st_model_config *cfg,
                          st_gguf_report *rep) {
    char src[4096];
    snprintf(src, sizeof src, "%s/tokenizer.json", dir);
    st_json *root = NULL, *tcfg = NULL;
    int rc = load_json(dir, "tokenizer.json", 1, &root);
    if (!rc) rc = load_json(dir, "tokenizer_config.json", 0, &tcfg);
    const st_json *model = root ? st_json_get(root, "model") : NULL;
    const char *type = model ? st_json_get_string(model, "type", "BPE") : NULL;
    if (!rc && (!model || strcmp(type, "BPE") != 0))
        rc = st_fail(ST_ECONFIG, "%s: model type '%s' cannot be exported to GGUF (BPE tokenizers only); "
                     "use --no-tokenizer to export the weights alone", src, model ? type : "(none)");
    vocab v = {0};
    int spm = model ? is_spm_style(root, model) : 0;
    if (!rc) {
        v.n = cfg->vocab;
        v.text = calloc((size_t)v.n, sizeof(char *));
        v.type = calloc((size_t)v.n, sizeof(int));
        v.scores = calloc((size_t)v.n, sizeof(float));
        if (!v.text || !v.type || !v.scores) rc = st_fail(ST_ENOMEM, "out of memory");
    }
    if (!rc) rc = fill_vocab(&v, root, model, spm, src);
    const char *unk = model ? st_json_get_string(model, "unk_token", NULL) : NULL;
    int unk_id = !rc && unk ? vocab_find(&v, unk, strlen(unk)) : -1;
    if (unk_id >= 0) v.type[unk_id] = TOK_UNKNOWN;
    const char *pattern = NULL, *pre_tok = pre ? pre : (rc || spm) ? NULL : pre_name(root, &pattern);
    if (!rc && !spm && !pre_tok)
        rc = st_fail(ST_ECONFIG, "%s: pre-tokenizer split pattern '%s' is not one whose llama.cpp name is known "
                     "here (llama-bpe, qwen2, gpt-2); pass --tokenizer-pre NAME (llama.cpp's name for it, e.g. "
                     "default)", src, pattern);
    if (!rc) {
        snprintf(rep->tokenizer_model, sizeof rep->tokenizer_model, "%s", spm ? "llama" : "gpt2");
        st_gguf_kv_str(kv, "tokenizer.ggml.model", rep->tokenizer_model);
        if (!spm) {
            snprintf(rep->tokenizer_pre, sizeof rep->tokenizer_pre, "%s", pre_tok);
            st_gguf_kv_str(kv, "tokenizer.ggml.pre", rep->tokenizer_pre);
        }
        /* scores are filled from the merges before the arrays are written */
        st_gguf_kv tmp = {{0}, 0};
        rc = add_merges(&tmp, &v, st_json_get(model, "merges"), spm, src);
        if (!rc) {
            add_vocab_arrays(kv, &v, spm);
            if (tmp.b.len) st_strbuf_append(&kv->b, tmp.b.data, tmp.b.len); /* none: no buffer (memcpy from NULL) */
            kv->n += tmp.n;
        }
        st_strbuf_free(&tmp.b);
    }
    if (!rc) {
        struct { const char *key, *cfg_key; int cfg_id; } ids[] = {
            {"tokenizer.ggml.bos_token_id", "bos_token", cfg->bos_id},
            {"tokenizer.ggml.eos_token_id", "eos_token", cfg->eos_id},
            {"tokenizer.ggml.padding_token_id", "pad_token", -1},
        };
        for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
            int id = special_id(&v, ids[i].cfg_id, tcfg, ids[i].cfg_key);
            if (id >= 0) st_gguf_kv_u32(kv, ids[i].key, (uint32_t)id);
        }
        if (unk_id >= 0) st_gguf_kv_u32(kv, "tokenizer.ggml.unknown_token_id", (uint32_t)unk_id);
        const char *flags[][2] = {{"add_bos_token", "tokenizer.ggml.add_bos_token"},
                                  {"add_eos_token", "tokenizer.ggml.add_eos_token"}};
        for (int i = 0; i < 2; i++) {
            const st_json *b = st_json_get(tcfg, flags[i][0]);
            if (b && b->type == ST_JSON_BOOL) st_gguf_kv_bool(kv, flags[i][1], b->boolean);
        }
        rc = add_chat_template(kv, dir, tcfg);
    }
    if (!rc) rep->has_tokenizer = 1;
    vocab_free(&v);
    st_json_free(root);
    st_json_free(tcfg);
    return rc;
}
