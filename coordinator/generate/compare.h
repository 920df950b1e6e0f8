/* compare.h — the blind base-vs-tuned evaluation (`shardtune compare`): the voting page and key
 * and the unblinded score (compare.c; the CLI is cmd_compare.c). Contract: DESIGN.md, docs/generate.md.
 * Nothing here prints; strings passed in stay the caller's. */
#ifndef ST_COMPARE_H
#define ST_COMPARE_H

#include <stdint.h>

/* |support - 0.5| within this reads as "about 50%": the "no real progress" band. */
#define ST_COMPARE_NEAR_HALF 0.005 /* "about 50%": rounds to 50% */

typedef struct {
    const char *id;     /* the prompt id (unique) */
    const char *prompt; /* display text */
    const char *base, *tuned; /* the two answers' display text */
} st_sheet_item;

/* Writes DIR/sheet.html (one self-contained page, no external assets) and DIR/key.json; which side
 * (A or B) holds the tuned answer is drawn per prompt from (seed, prompt index). DIR is created. */
int st_sheet_write(const char *dir, const st_sheet_item *items, int n, uint64_t seed);

/* The side of the tuned answer for prompt i: 'A' or 'B'. */
char st_sheet_tuned_side(uint64_t seed, int i);

typedef struct {
    int wins, losses, ties; /* tuned better, base better, tie (last vote per id) */
    int superseded;         /* earlier votes of a repeated id, replaced by its last one (not counted) */
    double support, lo, hi; /* wins / (wins + losses) and its 95% Wilson interval */
    const char *band;       /* the verdict (static string) */
} st_compare_result;

/* Unblinds VOTES (JSONL {"id", "vote": "A"|"B"|"tie"}) with DIR/key.json. Errors name the line. */
int st_compare_score(const char *dir, const char *votes_path, st_compare_result *r);

/* The verdict band of a support rate: "worse than the base" (< 50%), "no real progress" (within
 * ST_COMPARE_NEAR_HALF of 50%), "not good enough" (to 70%), "successful" (70-80%), "clear improvement". */
const char *st_compare_band(double support);

/* 95% Wilson score interval of `wins` successes in n trials (n > 0; [0, 1] when n = 0). */
void st_wilson95(int wins, int n, double *lo, double *hi);

#endif
