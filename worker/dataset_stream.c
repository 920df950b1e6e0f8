/* dataset_stream.c — writes a dataset file document by document in bounded memory (dataset.h,
 * st_dataset_writer): /tokens, /loss_mask and /doc_offsets are extendible chunked datasets (the layout
 * st_dataset_write makes), appended from fixed-size buffers; PATH.partial is renamed at close. */
#include "worker/dataset.h"
#include "worker/dataset_h5.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"

#define BUF_TOKENS (1u << 20) /* 5 MB of tokens and mask per flush */
#define BUF_OFFSETS (1u << 16)
#define CHUNK 65536

struct st_dataset_writer {
    char path[1100], tmp[1100];
    hid_t file, d[3]; /* tokens, loss_mask, doc_offsets */
    uint32_t *tok;
    uint8_t *mask;
    uint64_t *off;
    size_t n_tok, n_off;        /* buffered */
    uint64_t done[3];           /* written elements of each dataset */
    uint64_t tokens, docs, masked; /* totals */
    int64_t vocab, eos, max_id;  /* vocab <= 0: max_id + 1, known at close */
};

static hid_t create_extendible(hid_t file, const char *name, hid_t type) {
    hsize_t dims[1] = {0}, maxd[1] = {H5S_UNLIMITED}, chunk[1] = {CHUNK};
    hid_t space = H5Screate_simple(1, dims, maxd), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    int ok = space >= 0 && dcpl >= 0 && H5Pset_chunk(dcpl, 1, chunk) >= 0;
    if (ok && H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) ok = H5Pset_deflate(dcpl, 1) >= 0;
    hid_t d = ok ? H5Dcreate2(file, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT) : -1;
    if (dcpl >= 0) H5Pclose(dcpl);
    if (space >= 0) H5Sclose(space);
    return d;
}

/* Appends n elements of `data` to dataset i. */
static int append(st_dataset_writer *w, int i, hid_t mem_type, const void *data, size_t n) {
    if (n == 0) return 0;
    hsize_t size[1] = {w->done[i] + n}, start[1] = {w->done[i]}, count[1] = {n};
    if (H5Dset_extent(w->d[i], size) < 0) return -1;
    hid_t fs = H5Dget_space(w->d[i]), ms = H5Screate_simple(1, count, NULL);
    int ok = fs >= 0 && ms >= 0 && H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
             H5Dwrite(w->d[i], mem_type, ms, fs, H5P_DEFAULT, data) >= 0;
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    if (ok) w->done[i] += n;
    return ok ? 0 : -1;
}

static int flush_tokens(st_dataset_writer *w) {
    if (append(w, 0, H5T_NATIVE_UINT32, w->tok, w->n_tok) || append(w, 1, H5T_NATIVE_UINT8, w->mask, w->n_tok))
        return st_fail(ST_EIO, "cannot write %s (disk full or not writable?)", w->tmp);
    w->n_tok = 0;
    return 0;
}

static int flush_offsets(st_dataset_writer *w) {
    if (append(w, 2, H5T_NATIVE_UINT64, w->off, w->n_off))
        return st_fail(ST_EIO, "cannot write %s (disk full or not writable?)", w->tmp);
    w->n_off = 0;
    return 0;
}

int st_dataset_writer_open(st_dataset_writer **out, const char *path, int64_t vocab_size, int64_t eos_id) {
    *out = NULL;
    if (vocab_size > 0x100000000LL || eos_id < -1 || eos_id > 0xffffffffLL || (vocab_size > 0 && eos_id >= vocab_size))
        return st_fail(ST_EINVAL, "%s: vocab_size %lld / eos_id %lld out of range", path, (long long)vocab_size,
                       (long long)eos_id);
    st_dataset_writer *w = calloc(1, sizeof *w);
    if (!w) return st_fail(ST_ENOMEM, "out of memory");
    w->file = w->d[0] = w->d[1] = w->d[2] = -1;
    w->vocab = vocab_size;
    w->eos = eos_id;
    w->max_id = eos_id;
    if (snprintf(w->path, sizeof w->path, "%s", path) >= (int)sizeof w->path ||
        snprintf(w->tmp, sizeof w->tmp, "%s.partial", path) >= (int)sizeof w->tmp) {
        free(w);
        return st_fail(ST_EINVAL, "output path too long: %.100s...", path);
    }
    w->tok = malloc(BUF_TOKENS * sizeof *w->tok);
    w->mask = malloc(BUF_TOKENS);
    w->off = malloc(BUF_OFFSETS * sizeof *w->off);
    if (!w->tok || !w->mask || !w->off) {
        st_dataset_writer_abort(w);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    w->file = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w->file < 0) {
        int rc = st_fail(ST_EIO, "cannot create %s", w->tmp);
        st_dataset_writer_abort(w);
        return rc;
    }
    w->d[0] = create_extendible(w->file, "/tokens", H5T_STD_U32LE);
    w->d[1] = create_extendible(w->file, "/loss_mask", H5T_STD_U8LE);
    w->d[2] = create_extendible(w->file, "/doc_offsets", H5T_STD_U64LE);
    if (w->d[0] < 0 || w->d[1] < 0 || w->d[2] < 0) {
        int rc = st_fail(ST_EIO, "cannot write %s", w->tmp);
        st_dataset_writer_abort(w);
        return rc;
    }
    w->off[w->n_off++] = 0;
    *out = w;
    return 0;
}

/* One document from int32 (s32) or uint32 (u32) ids. */
static int add_doc(st_dataset_writer *w, const int32_t *s32, const uint32_t *u32, const uint8_t *mask, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int64_t id = s32 ? (int64_t)s32[i] : (int64_t)u32[i];
        if (id < 0 || (w->vocab > 0 && id >= w->vocab))
            return st_fail(ST_EINVAL, "token %lld of a document is outside the vocabulary (%lld)", (long long)id,
                           (long long)w->vocab);
        if (mask[i] > 1) return st_fail(ST_EINVAL, "loss_mask value %u is not 0 or 1", mask[i]);
        if (id > w->max_id) w->max_id = id;
        w->masked += !mask[i];
    }
    for (size_t i = 0; i < n;) {
        size_t take = n - i < BUF_TOKENS - w->n_tok ? n - i : BUF_TOKENS - w->n_tok;
        for (size_t j = 0; j < take; j++) w->tok[w->n_tok + j] = s32 ? (uint32_t)s32[i + j] : u32[i + j];
        memcpy(w->mask + w->n_tok, mask + i, take);
        w->n_tok += take, i += take;
        int rc = w->n_tok == BUF_TOKENS ? flush_tokens(w) : 0;
        if (rc) return rc;
    }
    w->tokens += n;
    w->docs++;
    w->off[w->n_off++] = w->tokens;
    return w->n_off == BUF_OFFSETS ? flush_offsets(w) : 0;
}

int st_dataset_writer_add(st_dataset_writer *w, const int32_t *tokens, const uint8_t *mask, size_t n) {
    return add_doc(w, tokens, NULL, mask, n);
}

int st_dataset_writer_add_u32(st_dataset_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n) {
    return add_doc(w, NULL, tokens, mask, n);
}

int st_dataset_writer_close(st_dataset_writer *w, st_dataset_summary *out) {
    int rc = 0;
    if (w->docs == 0 || w->tokens == 0) rc = st_fail(ST_EFORMAT, "%s: no %s", w->path, w->docs ? "tokens" : "documents");
    int64_t vocab = w->vocab > 0 ? w->vocab : w->max_id + 1;
    if (!rc) rc = flush_tokens(w);
    if (!rc) rc = flush_offsets(w);
    if (!rc && (st_dataset_h5_int_attr(w->file, "vocab_size", vocab) || st_dataset_h5_int_attr(w->file, "eos_id", w->eos)))
        rc = st_fail(ST_EIO, "cannot write %s", w->tmp);
    for (int i = 0; i < 3; i++)
        if (w->d[i] >= 0 && H5Dclose(w->d[i]) < 0 && !rc) rc = st_fail(ST_EIO, "cannot write %s", w->tmp);
    w->d[0] = w->d[1] = w->d[2] = -1;
    if (H5Fclose(w->file) < 0 && !rc) rc = st_fail(ST_EIO, "cannot write %s (disk full or not writable?)", w->tmp);
    w->file = -1;
    int fd = rc ? -1 : open(w->tmp, O_RDONLY);
    if (!rc && (fd < 0 || fsync(fd) != 0)) rc = st_fail(ST_EIO, "cannot write %s (disk full?)", w->tmp);
    if (fd >= 0) close(fd);
    if (!rc && rename(w->tmp, w->path) != 0) rc = st_fail(ST_EIO, "cannot rename %s to %s: %s", w->tmp, w->path, strerror(errno));
    if (!rc && out) {
        out->docs = w->docs, out->tokens = w->tokens, out->masked = w->masked;
        out->vocab_size = vocab, out->eos_id = w->eos;
    }
    st_dataset_writer_abort(w); /* frees; unlinks the partial file when it was not renamed */
    return rc;
}

void st_dataset_writer_abort(st_dataset_writer *w) {
    if (!w) return;
    for (int i = 0; i < 3; i++)
        if (w->d[i] >= 0) H5Dclose(w->d[i]);
    if (w->file >= 0) H5Fclose(w->file);
    unlink(w->tmp); /* gone already after a rename */
    free(w->tok), free(w->mask), free(w->off);
    free(w);
}
