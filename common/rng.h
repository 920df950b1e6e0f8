/* rng.h — the project's one deterministic random number generator (splitmix64-seeded xoshiro256**).
 * Used for weight init, data shuffling and splits, mixture sampling. State is a plain struct so it
 * can be saved in checkpoints. */
#ifndef ST_RNG_H
#define ST_RNG_H

#include <stdint.h>

typedef struct { uint64_t s[4]; } st_rng;

/* Seeds from a 64-bit seed and a stream id (different streams are independent). */
void st_rng_seed(st_rng *r, uint64_t seed, uint64_t stream);
uint64_t st_rng_u64(st_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double st_rng_uniform(st_rng *r);
/* Uniform integer in [0, n) without modulo bias (n > 0). */
uint64_t st_rng_below(st_rng *r, uint64_t n);
/* Standard normal (Box-Muller, one value per call). */
double st_rng_normal(st_rng *r);
/* Fisher-Yates shuffle of n uint64 values. */
void st_rng_shuffle_u64(st_rng *r, uint64_t *a, uint64_t n);

#endif
