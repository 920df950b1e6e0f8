/* pack_text.c — streams a JSONL file of text examples through st_sft_convert, one document at a time
 * to the caller's emit function (data pack --text writes them with st_dataset_writer). */
#include "text/pack_text.h"

#include "common/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

int st_text_pack(const char *path, const st_tokenizer *tok, const st_sft_opts *opts, st_text_emit_fn emit,
                 void *emit_ctx, st_text_progress_fn progress, void *ctx, st_text_pack_stats *stats) {
    memset(stats, 0, sizeof *stats);
    FILE *f = fopen(path, "rb");
    if (!f) return st_fail(ST_EIO, "%s: cannot open", path);
    struct stat stt;
    uint64_t total = fstat(fileno(f), &stt) == 0 && S_ISREG(stt.st_mode) ? (uint64_t)stt.st_size : 0, done = 0;
    int rc = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) { /* one line in memory at a time */
        stats->lines++;
        done += (uint64_t)len;
        if (blank(line, (size_t)len)) continue;
        st_json *row = NULL;
        st_sft_example ex = {0};
        rc = st_json_parse(line, (size_t)len, &row);
        if (rc == 0) rc = st_sft_convert(tok, opts, row, &ex);
        st_json_free(row);
        if (rc == 0) rc = emit(emit_ctx, ex.ids, ex.mask, ex.n);
        if (rc < 0) {
            st_sft_example_free(&ex);
            rc = st_fail_context(rc, "%s line %llu", path, (unsigned long long)stats->lines);
            break;
        }
        for (size_t i = 0; i < ex.n; i++) stats->trained += ex.mask[i];
        stats->examples++, stats->tokens += ex.n, stats->per_format[ex.format]++, stats->bos_dropped += (uint64_t)ex.bos_dropped;
        st_sft_example_free(&ex);
        if (progress && stats->lines % 256 == 0) progress(ctx, stats, done, total);
    }
    if (rc == 0 && ferror(f)) rc = st_fail(ST_EIO, "%s: read error", path);
    free(line);
    fclose(f);
    if (rc == 0 && !stats->examples) rc = st_fail(ST_EFORMAT, "%s: no examples", path);
    if (rc == 0 && progress) progress(ctx, stats, done, total);
    return rc;
}
