/* packing.h — `train.packing: documents`: whole documents packed into sequences (docs/data.md).
 *
 * A document of L tokens gives L-1 (input, target) positions. A document with more than T+1 tokens is
 * split into pieces of T+1 tokens at stride T (the stream's window rule, so a piece boundary loses no
 * target); a piece of one token (no target) is dropped. Pieces, in the given document order, go to
 * sequences of T positions by best fit: the open sequence with the least room that still fits (ties: the
 * one opened first); if none fits, a new sequence opens. Sequences are numbered in the order they open.
 * Every position gets a segment id (the piece's index in its sequence, 0, 1, ...) and a position inside
 * its piece (0, 1, ...); padding after the last piece has target 0, weight 0, and forms one more segment
 * whose positions restart at 0 (no real token attends to it: it comes after them all).
 *
 * st_packing owns its arrays (st_packing_free); it borrows nothing after st_packing_build returns. */
#ifndef ST_PACKING_H
#define ST_PACKING_H

#include <stddef.h>
#include <stdint.h>

#include "worker/dataset.h"

typedef struct {
    int T;
    uint64_t n_seq, n_pieces;
    uint64_t *seq_first;  /* [n_seq+1]: pieces of sequence s are order[seq_first[s] .. seq_first[s+1]) */
    uint64_t *piece_src;  /* [n_pieces]: token index in the dataset of the piece's first token */
    uint32_t *piece_len;  /* [n_pieces]: tokens in the piece (2..T+1) */
    uint64_t real_positions; /* target positions filled by documents (sum of piece_len - 1) */
} st_packing;

/* Packs docs[0..n) of ds (in that order) into sequences of T positions. */
int st_packing_build(st_packing *p, const st_dataset *ds, const uint64_t *docs, uint64_t n, int T);

/* Fills sequence s: inputs/targets/mask [T]; seg/pos [T] (each may be NULL). */
void st_packing_fill(const st_packing *p, const st_dataset *ds, uint64_t s, int32_t *inputs, int32_t *targets,
                     float *mask, int32_t *seg, int32_t *pos);

/* real positions / (n_seq * T), in [0, 1]. */
double st_packing_efficiency(const st_packing *p);

void st_packing_free(st_packing *p);

#endif
