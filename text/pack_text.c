/* pack_text.c — streams a JSONL file of text examples through st_sft_convert into a dataset. */
#include "text/pack_text.h"

#include "common/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    uint32_t *tok;
    uint8_t *mask;
    uint64_t *off;
    size_t n, cap, n_off, cap_off;
} dsbuild;

static int grow(dsbuild *b, size_t extra) {
    if (b->n + extra > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + extra) cap *= 2;
        uint32_t *t = realloc(b->tok, cap * sizeof *t);
        if (!t) return st_fail(ST_ENOMEM, "out of memory for the tokens");
        b->tok = t;
        uint8_t *m = realloc(b->mask, cap);
        if (!m) return st_fail(ST_ENOMEM, "out of memory for the tokens");
        b->mask = m, b->cap = cap;
    }
    if (b->n_off + 1 > b->cap_off) {
        size_t cap = b->cap_off ? b->cap_off * 2 : 1024;
        uint64_t *o = realloc(b->off, cap * sizeof *o);
        if (!o) return st_fail(ST_ENOMEM, "out of memory for the offsets");
        b->off = o, b->cap_off = cap;
    }
    return 0;
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

int st_text_pack(const char *path, const st_tokenizer *tok, const st_sft_opts *opts, int64_t eos_id,
                 st_text_progress_fn progress, void *ctx, st_dataset *out, st_text_pack_stats *stats) {
    memset(out, 0, sizeof *out);
    memset(stats, 0, sizeof *stats);
    FILE *f = fopen(path, "rb");
    if (!f) return st_fail(ST_EIO, "%s: cannot open", path);
    struct stat stt;
    uint64_t total = fstat(fileno(f), &stt) == 0 ? (uint64_t)stt.st_size : 0, done = 0;
    dsbuild b = {0};
    int rc = grow(&b, 0);
    if (rc == 0) b.off[b.n_off++] = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
        stats->lines++;
        done += (uint64_t)len;
        if (blank(line, (size_t)len)) continue;
        st_json *row = NULL;
        st_sft_example ex = {0};
        rc = st_json_parse(line, (size_t)len, &row);
        if (rc == 0) rc = st_sft_convert(tok, opts, row, &ex);
        st_json_free(row);
        if (rc == 0) rc = grow(&b, ex.n);
        if (rc < 0) {
            st_sft_example_free(&ex);
            rc = st_fail_context(rc, "%s line %llu", path, (unsigned long long)stats->lines);
            break;
        }
        for (size_t i = 0; i < ex.n; i++) {
            b.tok[b.n + i] = (uint32_t)ex.ids[i];
            b.mask[b.n + i] = ex.mask[i];
            stats->trained += ex.mask[i];
        }
        b.n += ex.n;
        b.off[b.n_off++] = b.n;
        stats->examples++, stats->tokens += ex.n, stats->per_format[ex.format]++, stats->bos_dropped += (uint64_t)ex.bos_dropped;
        st_sft_example_free(&ex);
        if (progress && stats->examples % 1000 == 0) progress(ctx, stats, done, total);
    }
    if (rc == 0 && ferror(f)) rc = st_fail(ST_EIO, "%s: read error", path);
    free(line);
    fclose(f);
    if (rc == 0 && !stats->examples) rc = st_fail(ST_EFORMAT, "%s: no examples", path);
    if (rc < 0) { free(b.tok); free(b.mask); free(b.off); return rc; }
    if (progress) progress(ctx, stats, done, total);
    out->tokens = b.tok, out->loss_mask = b.mask, out->doc_offsets = b.off;
    out->n_tokens = b.n, out->n_docs = b.n_off - 1;
    out->vocab_size = (int64_t)st_tokenizer_vocab_size(tok);
    out->eos_id = eos_id;
    out->checksum = st_dataset_checksum(out);
    rc = st_dataset_validate(out, path);
    if (rc < 0) st_dataset_free(out);
    return rc;
}
