/* ckpt_layout.c — the pure arithmetic of checkpoints: the position-keyed checksum, flat ranges as
 * hyperslab boxes, even splits of a range over ranks, chunk shapes and chunk ownership. No I/O, no
 * allocation. */
#include <string.h>

#include "checkpoints/ckpt.h"

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

uint64_t st_ckpt_splitmix64(uint64_t z) { return mix64(z); }

/* Position-keyed, so a swapped pair of values changes the sum; additive, so ranks sum their own
 * ranges and one MPI_Allreduce (uint64 addition wraps) gives the whole tensor's value. Integer
 * arithmetic only: every variant below gives the same bits. */
#define CHECKSUM_BODY                                                                  \
    uint64_t sum = 0;                                                                  \
    for (size_t k = 0; k < n; k++) {                                                   \
        uint32_t bits;                                                                 \
        memcpy(&bits, &x[k], sizeof bits);                                             \
        sum += mix64((first + k) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)bits); \
    }                                                                                  \
    return sum;

static uint64_t checksum_plain(const float *x, uint64_t first, size_t n) { CHECKSUM_BODY }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* AVX-512DQ has 64-bit vector multiplies (vpmullq). Two per 8 elements: the position key
 * (first + k) * golden is kept as a running sum (8 * golden added per step) instead of a third
 * multiply, and two independent accumulators hide the multiply latency. Same bits as the plain loop:
 * every operation is the same modulo 2^64. */
#define ST_CKS_TARGET __attribute__((target("avx512f,avx512dq")))
ST_CKS_TARGET static inline __m512i mix8(__m512i z) {
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 30));
    z = _mm512_mullo_epi64(z, _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 27));
    z = _mm512_mullo_epi64(z, _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

ST_CKS_TARGET static uint64_t checksum_avx512(const float *x, uint64_t first, size_t n) {
    const uint64_t gold = 0x9E3779B97F4A7C15ULL;
    __m512i key0 = _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64((long long)first),
                                                       _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)),
                                      _mm512_set1_epi64((long long)gold));
    __m512i key1 = _mm512_add_epi64(key0, _mm512_set1_epi64((long long)(8 * gold)));
    const __m512i step = _mm512_set1_epi64((long long)(16 * gold));
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    size_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512i b0 = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(x + k)));
        __m512i b1 = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(x + k + 8)));
        acc0 = _mm512_add_epi64(acc0, mix8(_mm512_xor_si512(key0, b0)));
        acc1 = _mm512_add_epi64(acc1, mix8(_mm512_xor_si512(key1, b1)));
        key0 = _mm512_add_epi64(key0, step);
        key1 = _mm512_add_epi64(key1, step);
    }
    /* the lanes summed as uint64_t: GCC's _mm512_reduce_add_epi64 adds signed long longs (UB on overflow) */
    uint64_t lane[8], sum = 0;
    _mm512_storeu_si512(lane, _mm512_add_epi64(acc0, acc1));
    for (int j = 0; j < 8; j++) sum += lane[j];
    return sum + checksum_plain(x + k, first + k, n - k);
}
#endif

uint64_t st_ckpt_checksum(const float *x, uint64_t first, size_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return checksum_avx512(x, first, n);
#endif
    return checksum_plain(x, first, n);
}

static void box(st_ckpt_slab *s, uint64_t r, uint64_t nr, uint64_t c, uint64_t nc) {
    s->start[0] = r;
    s->count[0] = nr;
    s->start[1] = c;
    s->count[1] = nc;
}

int st_ckpt_range_slabs(int ndim, const int64_t shape[2], uint64_t a, uint64_t b, st_ckpt_slab out[3]) {
    if (a >= b) return 0;
    if (ndim == 1) {
        box(&out[0], a, b - a, 0, 0);
        return 1;
    }
    uint64_t C = (uint64_t)shape[1];
    uint64_t r0 = a / C, c0 = a % C, r1 = b / C, c1 = b % C; /* b is exclusive: row r1 holds c1 elements */
    if (r0 == r1) {
        box(&out[0], r0, 1, c0, c1 - c0);
        return 1;
    }
    int n = 0;
    if (c0 > 0) {
        box(&out[n++], r0, 1, c0, C - c0);
        r0++;
    }
    if (r1 > r0) box(&out[n++], r0, r1 - r0, 0, C);
    if (c1 > 0) box(&out[n++], r1, 1, 0, c1);
    return n;
}

void st_ckpt_even_split(uint64_t n, int world, int rank, uint64_t *lo, uint64_t *hi) {
    /* 128-bit-safe for any realistic n: n * world fits 64 bits below 2^48 elements x 2^16 ranks */
    *lo = (uint64_t)((unsigned __int128)n * (unsigned)rank / (unsigned)world);
    *hi = (uint64_t)((unsigned __int128)n * (unsigned)(rank + 1) / (unsigned)world);
}

void st_ckpt_chunk_shape(int ndim, const int64_t shape[2], uint64_t chunk[2]) {
    const uint64_t target = ST_CKPT_CHUNK_BYTES / sizeof(float);
    uint64_t rows = (uint64_t)shape[0], cols = ndim == 2 ? (uint64_t)shape[1] : 1;
    uint64_t want = cols >= target ? 1 : target / (cols ? cols : 1);
    chunk[0] = want < rows ? want : rows;
    chunk[1] = cols;
    if (chunk[0] == 0) chunk[0] = 1;
    if (chunk[1] == 0) chunk[1] = 1;
}

void st_ckpt_model_part(int ndim, const int64_t shape[2], int world, int rank, int tensor_index, uint64_t *lo,
                        uint64_t *hi) {
    uint64_t chunk[2];
    st_ckpt_chunk_shape(ndim, shape, chunk);
    uint64_t rows = (uint64_t)shape[0], cols = ndim == 2 ? (uint64_t)shape[1] : 1;
    uint64_t n_chunks = (rows + chunk[0] - 1) / chunk[0];
    int share = (int)(((unsigned)rank + (unsigned)tensor_index) % (unsigned)world);
    uint64_t c0, c1;
    st_ckpt_even_split(n_chunks, world, share, &c0, &c1);
    uint64_t r0 = c0 * chunk[0], r1 = c1 * chunk[0];
    if (r0 > rows) r0 = rows;
    if (r1 > rows) r1 = rows;
    *lo = r0 * cols;
    *hi = r1 * cols;
}
