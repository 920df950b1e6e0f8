/* packing.c — best-fit packing of whole documents into sequences (rules in packing.h, docs/data.md). */
#include "worker/packing.h"
#include "common/error.h"

#include <stdlib.h>
#include <string.h>

static uint64_t n_pieces_of(uint64_t len, int T) { return len < 2 ? 0 : (len - 2) / (uint64_t)T + 1; }

/* Open sequences bucketed by their room r (0..T): FIFO lists, and a bitmap of the non-empty buckets so
 * the smallest room >= need is a short scan of 64-bit words. */
typedef struct {
    int T;
    uint64_t *head, *tail, *next; /* per room: first/last sequence; per sequence: the next in its bucket */
    uint64_t *bits;
} rooms;

#define NIL UINT64_MAX

static void rooms_push(rooms *R, int r, uint64_t s) {
    R->next[s] = NIL;
    if (R->head[r] == NIL) R->head[r] = s;
    else R->next[R->tail[r]] = s;
    R->tail[r] = s;
    R->bits[r >> 6] |= 1ULL << (r & 63);
}

static uint64_t rooms_pop(rooms *R, int r) {
    uint64_t s = R->head[r];
    R->head[r] = R->next[s];
    if (R->head[r] == NIL) R->bits[r >> 6] &= ~(1ULL << (r & 63));
    return s;
}

/* The smallest room >= need with an open sequence, or -1. */
static int rooms_find(const rooms *R, int need) {
    int w = need >> 6, nw = (R->T >> 6) + 1;
    uint64_t m = R->bits[w] & (~0ULL << (need & 63));
    while (!m) {
        if (++w >= nw) return -1;
        m = R->bits[w];
    }
    return (w << 6) + __builtin_ctzll(m);
}

static int place_pieces(st_packing *p, const st_dataset *ds, const uint64_t *docs, uint64_t n, uint64_t *seq_of,
                        uint32_t *room_left) {
    const int T = p->T;
    rooms R = {T, NULL, NULL, NULL, NULL};
    R.head = malloc((size_t)(T + 1) * sizeof(uint64_t));
    R.tail = malloc((size_t)(T + 1) * sizeof(uint64_t));
    R.next = malloc((p->n_pieces + 1) * sizeof(uint64_t));
    R.bits = calloc((size_t)(T >> 6) + 1, sizeof(uint64_t));
    int rc = 0;
    if (!R.head || !R.tail || !R.next || !R.bits) rc = st_fail(ST_ENOMEM, "out of memory packing documents");
    for (int r = 0; rc == 0 && r <= T; r++) R.head[r] = R.tail[r] = NIL;
    uint64_t i = 0;
    for (uint64_t d = 0; rc == 0 && d < n; d++) {
        uint64_t start = ds->doc_offsets[docs[d]], len = ds->doc_offsets[docs[d] + 1] - start;
        for (uint64_t k = 0; k < n_pieces_of(len, T); k++, i++) {
            uint64_t off = k * (uint64_t)T, plen = len - off < (uint64_t)T + 1 ? len - off : (uint64_t)T + 1;
            int need = (int)plen - 1, r = rooms_find(&R, need);
            uint64_t s = r < 0 ? p->n_seq++ : rooms_pop(&R, r);
            if (r < 0) r = T;
            p->piece_src[i] = start + off;
            p->piece_len[i] = (uint32_t)plen;
            seq_of[i] = s;
            room_left[s] = (uint32_t)(r - need);
            if (r - need > 0) rooms_push(&R, r - need, s); /* a full sequence never takes another piece */
            p->real_positions += (uint64_t)need;
        }
    }
    free(R.head);
    free(R.tail);
    free(R.next);
    free(R.bits);
    return rc;
}

/* Reorders the pieces by sequence (stable: placement order inside a sequence). */
static int group_by_sequence(st_packing *p, const uint64_t *seq_of) {
    uint64_t *first = calloc(p->n_seq + 1, sizeof *first), *src = malloc((p->n_pieces + 1) * sizeof *src);
    uint32_t *len = malloc((p->n_pieces + 1) * sizeof *len);
    uint64_t *fill = malloc((p->n_seq + 1) * sizeof *fill);
    if (!first || !src || !len || !fill) {
        free(first); free(src); free(len); free(fill);
        return st_fail(ST_ENOMEM, "out of memory packing documents");
    }
    for (uint64_t i = 0; i < p->n_pieces; i++) first[seq_of[i] + 1]++;
    for (uint64_t s = 0; s < p->n_seq; s++) first[s + 1] += first[s];
    memcpy(fill, first, p->n_seq * sizeof *fill);
    for (uint64_t i = 0; i < p->n_pieces; i++) {
        uint64_t at = fill[seq_of[i]]++;
        src[at] = p->piece_src[i];
        len[at] = p->piece_len[i];
    }
    free(fill);
    free(p->piece_src);
    free(p->piece_len);
    p->piece_src = src;
    p->piece_len = len;
    p->seq_first = first;
    return 0;
}

int st_packing_build(st_packing *p, const st_dataset *ds, const uint64_t *docs, uint64_t n, int T) {
    memset(p, 0, sizeof *p);
    if (T < 1) return st_fail(ST_EINVAL, "packing: seq_len must be >= 1");
    p->T = T;
    for (uint64_t d = 0; d < n; d++)
        p->n_pieces += n_pieces_of(ds->doc_offsets[docs[d] + 1] - ds->doc_offsets[docs[d]], T);
    p->piece_src = malloc((p->n_pieces + 1) * sizeof *p->piece_src);
    p->piece_len = malloc((p->n_pieces + 1) * sizeof *p->piece_len);
    uint64_t *seq_of = malloc((p->n_pieces + 1) * sizeof *seq_of);
    uint32_t *room = malloc((p->n_pieces + 1) * sizeof *room); /* never more sequences than pieces */
    int rc = p->piece_src && p->piece_len && seq_of && room ? 0 : st_fail(ST_ENOMEM, "out of memory packing documents");
    if (rc == 0) rc = place_pieces(p, ds, docs, n, seq_of, room);
    if (rc == 0) rc = group_by_sequence(p, seq_of);
    free(seq_of);
    free(room);
    if (rc < 0) st_packing_free(p);
    return rc;
}

void st_packing_fill(const st_packing *p, const st_dataset *ds, uint64_t s, int32_t *inputs, int32_t *targets,
                     float *mask, int32_t *seg, int32_t *pos) {
    int o = 0, id = 0;
    for (uint64_t i = p->seq_first[s]; i < p->seq_first[s + 1]; i++, id++) {
        uint64_t src = p->piece_src[i];
        for (int j = 0; j + 1 < (int)p->piece_len[i]; j++, o++) {
            inputs[o] = (int32_t)ds->tokens[src + j];
            targets[o] = (int32_t)ds->tokens[src + j + 1];
            mask[o] = (float)ds->loss_mask[src + j + 1];
            if (seg) seg[o] = id;
            if (pos) pos[o] = j;
        }
    }
    for (int j = 0; o < p->T; o++, j++) { /* padding: its own segment, no loss */
        inputs[o] = targets[o] = 0;
        mask[o] = 0.0f;
        if (seg) seg[o] = id;
        if (pos) pos[o] = j;
    }
}

double st_packing_efficiency(const st_packing *p) {
    return p->n_seq ? (double)p->real_positions / ((double)p->n_seq * (double)p->T) : 0.0;
}

void st_packing_free(st_packing *p) {
    if (!p) return;
    free(p->seq_first);
    free(p->piece_src);
    free(p->piece_len);
    memset(p, 0, sizeof *p);
}
