/* dataset_pack.c — `shardtune data pack` converters: JSONL (input_ids / labels) and llm.c .bin shards
 * into an in-memory st_dataset (see dataset.h). The output arrays are malloc'ed and owned by the
 * st_dataset; on failure nothing is left allocated. */
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "worker/dataset.h"

#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ST_LABEL_IGNORE (-100) /* Hugging Face's ignore_index */
#define ST_MAX_TOKEN_ID 0xffffffffLL

/* Growable token / mask / offset arrays. */
typedef struct {
    uint32_t *tok;
    uint8_t *mask;
    size_t n, cap;
    uint64_t *off;
    size_t n_off, cap_off;
    int64_t max_id;
} builder;

static int builder_reserve(builder *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->n + extra) cap *= 2;
    uint32_t *t = realloc(b->tok, cap * sizeof *t);
    if (!t) return st_fail(ST_ENOMEM, "out of memory packing %zu tokens", cap);
    b->tok = t;
    uint8_t *m = realloc(b->mask, cap);
    if (!m) return st_fail(ST_ENOMEM, "out of memory packing %zu tokens", cap);
    b->mask = m;
    b->cap = cap;
    return 0;
}

static int builder_push_offset(builder *b, uint64_t off) {
    if (b->n_off == b->cap_off) {
        size_t cap = b->cap_off ? 2 * b->cap_off : 256;
        uint64_t *o = realloc(b->off, cap * sizeof *o);
        if (!o) return st_fail(ST_ENOMEM, "out of memory packing %zu documents", cap);
        b->off = o;
        b->cap_off = cap;
    }
    b->off[b->n_off++] = off;
    return 0;
}

static void builder_free(builder *b) {
    free(b->tok);
    free(b->mask);
    free(b->off);
    memset(b, 0, sizeof *b);
}

/* Moves the builder's arrays into `out` and validates the result. */
static int builder_finish(builder *b, const char *name, int64_t vocab, int64_t eos_id, st_dataset *out) {
    if (b->n_off < 2 || b->n == 0) {
        builder_free(b);
        return st_fail(ST_EFORMAT, "%s: no documents", name);
    }
    if (vocab <= 0) vocab = (b->max_id > eos_id ? b->max_id : eos_id) + 1;
    memset(out, 0, sizeof *out);
    out->tokens = b->tok;
    out->loss_mask = b->mask;
    out->doc_offsets = b->off;
    out->n_tokens = b->n;
    out->n_docs = b->n_off - 1;
    out->vocab_size = vocab;
    out->eos_id = eos_id;
    memset(b, 0, sizeof *b);
    int rc = st_dataset_validate(out, name);
    if (rc < 0) {
        st_dataset_free(out);
        return rc;
    }
    out->checksum = st_dataset_checksum(out);
    return 0;
}

static int check_eos(int64_t vocab, int64_t eos_id) {
    if (eos_id > ST_MAX_TOKEN_ID) return st_fail(ST_EINVAL, "--eos %lld does not fit in uint32", (long long)eos_id);
    if (vocab > ST_MAX_TOKEN_ID + 1) return st_fail(ST_EINVAL, "--vocab %lld is larger than 2^32", (long long)vocab);
    if (vocab > 0 && eos_id >= vocab)
        return st_fail(ST_EINVAL, "--eos %lld is not below --vocab %lld", (long long)eos_id, (long long)vocab);
    return 0;
}

/* ---------------------------------------------------------------- JSONL */

/* Checks one token id (input_ids[i]) and returns it through *id. */
static int json_token(const st_json *v, size_t i, int64_t vocab, int64_t *id) {
    if (v->type != ST_JSON_NUMBER || !v->is_integer)
        return st_fail(ST_EFORMAT, "input_ids[%zu] is not an integer", i);
    if (v->integer < 0) return st_fail(ST_EFORMAT, "input_ids[%zu] = %lld is negative", i, (long long)v->integer);
    if (v->integer > ST_MAX_TOKEN_ID)
        return st_fail(ST_EFORMAT, "input_ids[%zu] = %lld does not fit in uint32", i, (long long)v->integer);
    if (vocab > 0 && v->integer >= vocab)
        return st_fail(ST_EFORMAT, "input_ids[%zu] = %lld is not below vocab size %lld", i, (long long)v->integer,
                       (long long)vocab);
    *id = v->integer;
    return 0;
}

/* Appends the document of one parsed JSONL line. */
static int json_document(builder *b, const st_json *obj, int64_t vocab, int64_t eos_id) {
    if (obj->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "line is not a JSON object");
    const st_json *ids = st_json_get(obj, "input_ids");
    if (!ids) return st_fail(ST_EFORMAT, "missing \"input_ids\"");
    if (ids->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "\"input_ids\" is not an array");
    if (ids->count == 0) return st_fail(ST_EFORMAT, "\"input_ids\" is empty");
    const st_json *labels = st_json_get(obj, "labels");
    if (labels && labels->type == ST_JSON_NULL) labels = NULL;
    if (labels && labels->type != ST_JSON_ARRAY) return st_fail(ST_EFORMAT, "\"labels\" is not an array");
    if (labels && labels->count != ids->count)
        return st_fail(ST_EFORMAT, "\"labels\" has %zu entries but \"input_ids\" has %zu", labels->count, ids->count);
    int rc = builder_reserve(b, ids->count + 1);
    if (rc < 0) return rc;
    for (size_t i = 0; i < ids->count; i++) {
        int64_t id = 0;
        if ((rc = json_token(ids->items[i], i, vocab, &id)) < 0) return rc;
        uint8_t m = 1;
        if (labels) {
            const st_json *l = labels->items[i];
            if (l->type != ST_JSON_NUMBER || !l->is_integer)
                return st_fail(ST_EFORMAT, "labels[%zu] is not an integer", i);
            if (l->integer == ST_LABEL_IGNORE) m = 0;
            else if (l->integer != id)
                return st_fail(ST_EFORMAT, "labels[%zu] = %lld differs from input_ids[%zu] = %lld (use -100 to mask)",
                               i, (long long)l->integer, i, (long long)id);
        }
        if (id > b->max_id) b->max_id = id;
        b->tok[b->n + i] = (uint32_t)id;
        b->mask[b->n + i] = m;
    }
    b->n += ids->count;
    if (eos_id >= 0) { /* the model learns to end a document: EOS is a target */
        b->tok[b->n] = (uint32_t)eos_id;
        b->mask[b->n] = 1;
        b->n++;
    }
    return builder_push_offset(b, b->n);
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

int st_dataset_pack_jsonl_buffer(const char *name, const char *text, size_t len, int64_t vocab, int64_t eos_id,
                                 st_dataset *out) {
    memset(out, 0, sizeof *out);
    int rc = check_eos(vocab, eos_id);
    if (rc < 0) return rc;
    builder b = {0};
    b.max_id = -1;
    if ((rc = builder_push_offset(&b, 0)) < 0) return rc;
    size_t pos = 0, line_no = 0;
    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len;
        line_no++;
        const char *line = text + pos;
        size_t n = end - pos;
        pos = end + 1;
        if (blank(line, n)) continue;
        st_json *obj = NULL;
        rc = st_json_parse(line, n, &obj);
        if (rc == 0) rc = json_document(&b, obj, vocab, eos_id);
        st_json_free(obj);
        if (rc < 0) {
            builder_free(&b);
            return st_fail_context(rc, "%s:%zu", name, line_no);
        }
    }
    return builder_finish(&b, name, vocab, eos_id, out);
}

int st_dataset_pack_jsonl(const char *jsonl_path, int64_t vocab, int64_t eos_id, st_dataset *out) {
    memset(out, 0, sizeof *out);
    char *text = NULL;
    size_t len = 0;
    int rc = st_read_file(jsonl_path, &text, &len);
    if (rc < 0) return rc;
    rc = st_dataset_pack_jsonl_buffer(jsonl_path, text, len, vocab, eos_id, out);
    free(text);
    return rc;
}

int st_dataset_pack_jsonl_file(const char *jsonl_path, const char *out_path, int64_t vocab, int64_t eos_id,
                               st_pack_progress_fn progress, void *ctx, st_dataset_summary *out) {
    int rc = check_eos(vocab, eos_id);
    if (rc < 0) return rc;
    FILE *f = fopen(jsonl_path, "rb");
    if (!f) return st_fail(ST_EIO, "%s: cannot open: %s", jsonl_path, strerror(errno));
    struct stat stt;
    uint64_t total = fstat(fileno(f), &stt) == 0 && S_ISREG(stt.st_mode) ? (uint64_t)stt.st_size : 0, done = 0;
    st_dataset_writer *w = NULL;
    if ((rc = st_dataset_writer_open(&w, out_path, vocab, eos_id)) < 0) { fclose(f); return rc; }
    builder b = {0}; /* one document at a time */
    char *line = NULL;
    size_t cap = 0, line_no = 0, tokens = 0;
    ssize_t n;
    while (rc == 0 && (n = getline(&line, &cap, f)) >= 0) {
        line_no++;
        done += (uint64_t)n;
        size_t len = (size_t)n;
        if (len && line[len - 1] == '\n') len--;
        if (blank(line, len)) continue;
        st_json *obj = NULL;
        b.n = 0, b.n_off = 0, b.max_id = -1;
        rc = st_json_parse(line, len, &obj);
        if (rc == 0) rc = json_document(&b, obj, vocab, eos_id);
        st_json_free(obj);
        if (rc == 0) rc = st_dataset_writer_add_u32(w, b.tok, b.mask, b.n);
        if (rc < 0) rc = st_fail_context(rc, "%s:%zu", jsonl_path, line_no);
        tokens += b.n;
        if (progress && line_no % 4096 == 0) progress(ctx, line_no, tokens, done, total);
    }
    if (rc == 0 && ferror(f)) rc = st_fail(ST_EIO, "%s: read error", jsonl_path);
    free(line);
    fclose(f);
    builder_free(&b);
    if (rc == 0 && progress) progress(ctx, line_no, tokens, done, total);
    if (rc < 0) {
        st_dataset_writer_abort(w);
        return rc;
    }
    rc = st_dataset_writer_close(w, out);
    return rc < 0 && strstr(st_error(), "no documents") ? st_fail(ST_EFORMAT, "%s: no documents", jsonl_path) : rc;
}

/* ---------------------------------------------------------------- llm.c shards */

#define LLMC_HEADER_INTS 256
#define LLMC_MAGIC 20240520
#define LLMC_VERSION 1 /* uint16 tokens (GPT-2); version 2 is uint32 (Llama 3), not supported */

/* Reads and checks one shard's header; returns its token count. */
static int llmc_header(FILE *f, const char *path, uint64_t *n_tokens) {
    struct stat st;
    if (fstat(fileno(f), &st) != 0) return st_fail(ST_EIO, "cannot stat %s", path);
    int32_t h[LLMC_HEADER_INTS];
    if (st.st_size < (off_t)sizeof h || fread(h, sizeof h, 1, f) != 1)
        return st_fail(ST_EFORMAT, "%s: truncated header (%lld bytes, llm.c shards start with %zu)", path,
                       (long long)st.st_size, sizeof h);
    if (h[0] != LLMC_MAGIC)
        return st_fail(ST_EFORMAT, "%s: bad magic %d (expected llm.c's %d)", path, h[0], LLMC_MAGIC);
    if (h[1] != LLMC_VERSION)
        return st_fail(ST_EFORMAT, "%s: unsupported llm.c version %d (only 1 = uint16 tokens)", path, h[1]);
    if (h[2] < 0) return st_fail(ST_EFORMAT, "%s: negative token count %d", path, h[2]);
    uint64_t want = sizeof h + 2 * (uint64_t)h[2];
    if ((uint64_t)st.st_size < want)
        return st_fail(ST_EFORMAT, "%s: truncated: header says %d tokens (%llu bytes) but the file has %lld bytes",
                       path, h[2], (unsigned long long)want, (long long)st.st_size);
    if ((uint64_t)st.st_size > want)
        return st_fail(ST_EFORMAT, "%s: %llu unexpected bytes after its %d tokens", path,
                       (unsigned long long)((uint64_t)st.st_size - want), h[2]);
    *n_tokens = (uint64_t)h[2];
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Reads all shards' tokens back to back into b (documents are found afterwards). */
static int llmc_read_all(const char *pattern, char **paths, size_t n_paths, builder *b) {
    uint64_t *counts = calloc(n_paths, sizeof *counts);
    if (!counts) return st_fail(ST_ENOMEM, "out of memory");
    uint64_t total = 0;
    int rc = 0;
    for (size_t i = 0; i < n_paths && rc == 0; i++) { /* first pass: headers and sizes only */
        FILE *f = fopen(paths[i], "rb");
        if (!f) { rc = st_fail(ST_EIO, "cannot open %s: %s", paths[i], strerror(errno)); break; }
        rc = llmc_header(f, paths[i], &counts[i]);
        fclose(f);
        total += counts[i];
    }
    if (rc == 0 && total == 0) rc = st_fail(ST_EFORMAT, "the shards matching '%s' hold no tokens", pattern);
    if (rc == 0) rc = builder_reserve(b, total);
    uint16_t *buf = rc == 0 ? malloc(1 << 20) : NULL;
    if (rc == 0 && !buf) rc = st_fail(ST_ENOMEM, "out of memory");
    for (size_t i = 0; i < n_paths && rc == 0; i++) {
        FILE *f = fopen(paths[i], "rb");
        if (!f) { rc = st_fail(ST_EIO, "cannot open %s: %s", paths[i], strerror(errno)); break; }
        uint64_t left = counts[i], again = 0;
        /* Re-check: the file may have changed since the first pass. */
        rc = llmc_header(f, paths[i], &again);
        if (rc == 0 && again != counts[i]) rc = st_fail(ST_EIO, "%s changed while reading", paths[i]);
        while (rc == 0 && left > 0) {
            size_t want = left < (1 << 19) ? (size_t)left : (1 << 19);
            if (fread(buf, 2, want, f) != want) { rc = st_fail(ST_EIO, "short read on %s", paths[i]); break; }
            for (size_t k = 0; k < want; k++) {
                b->tok[b->n + k] = buf[k];
                b->mask[b->n + k] = 1;
                if (buf[k] > b->max_id) b->max_id = buf[k];
            }
            b->n += want;
            left -= want;
        }
        fclose(f);
    }
    free(buf);
    free(counts);
    return rc;
}

int st_dataset_pack_llmc(const char *glob_pattern, int64_t vocab, int64_t eos_id, st_dataset *out) {
    memset(out, 0, sizeof *out);
    if (eos_id < 0) eos_id = ST_GPT2_EOT;
    int rc = check_eos(vocab, eos_id);
    if (rc < 0) return rc;
    glob_t g;
    memset(&g, 0, sizeof g);
    int grc = glob(glob_pattern, 0, NULL, &g);
    if (grc == GLOB_NOMATCH || (grc == 0 && g.gl_pathc == 0)) {
        globfree(&g);
        return st_fail(ST_EIO, "no files match '%s'", glob_pattern);
    }
    if (grc != 0) {
        globfree(&g);
        return st_fail(ST_EIO, "cannot expand '%s'", glob_pattern);
    }
    qsort(g.gl_pathv, g.gl_pathc, sizeof *g.gl_pathv, cmp_str); /* byte order, independent of locale */
    builder b = {0};
    b.max_id = -1;
    rc = llmc_read_all(glob_pattern, g.gl_pathv, g.gl_pathc, &b);
    /* A document starts at the beginning of the stream and at every EOS after it. */
    if (rc == 0) rc = builder_push_offset(&b, 0);
    for (size_t i = 1; i < b.n && rc == 0; i++)
        if (b.tok[i] == (uint32_t)eos_id) rc = builder_push_offset(&b, i);
    if (rc == 0) rc = builder_push_offset(&b, b.n);
    if (rc == 0 && vocab > 0 && b.max_id >= vocab) {
        for (size_t i = 0; i < b.n; i++)
            if (b.tok[i] >= vocab) {
                rc = st_fail(ST_EFORMAT, "'%s': token %zu of the stream = %u is not below --vocab %lld", glob_pattern,
                             i, b.tok[i], (long long)vocab);
                break;
            }
    }
    if (rc < 0) {
        builder_free(&b);
        globfree(&g);
        return rc;
    }
    globfree(&g);
    return builder_finish(&b, glob_pattern, vocab, eos_id, out);
}
