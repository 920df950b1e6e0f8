/* cpu_embedding.c — token (+ learned position) embedding lookup and its backward.
 *
 * Backward is parallel over column ranges, never over tokens: each thread owns some channels of every
 * dwte/dwpe row and adds the tokens in sequence order, so repeated tokens accumulate in the same order
 * for any thread count. Token ids are trusted here (the data loader checks them against the vocab).
 * dwte/dwpe ACCUMULATE; out is overwritten. Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <omp.h>

void st_cpu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                          int c) {
    long rows = (long)b * t;
#pragma omp parallel for schedule(static) if (rows * c >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        float *restrict o = out + (size_t)r * c;
        const float *restrict e = wte + (size_t)tokens[r] * c;
        if (wpe) {
            const float *restrict p = wpe + (size_t)(r % t) * c;
            for (int j = 0; j < c; j++) o[j] = e[j] + p[j];
        } else {
            memcpy(o, e, (size_t)c * sizeof(float));
        }
    }
}

void st_cpu_embedding_bwd(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int b, int t,
                          int c) {
    long rows = (long)b * t;
    int par = rows * c >= ST_CPU_PAR_MIN;
#pragma omp parallel if (par)
    {
        /* columns [c0, c1) for this thread, in multiples of 16 floats (one cache line's worth of work) */
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = ((c + nt - 1) / nt + 15) / 16 * 16;
        int c0 = id * per < c ? id * per : c;
        int c1 = c0 + per < c ? c0 + per : c;
        int w = c1 - c0;
        if (w > 0) {
            for (long r = 0; r < rows; r++) {
                const float *restrict d = dout + (size_t)r * c + c0;
                float *restrict e = dwte + (size_t)tokens[r] * c + c0;
                for (int j = 0; j < w; j++) e[j] += d[j];
                if (dwpe) {
                    float *restrict p = dwpe + (size_t)(r % t) * c + c0;
                    for (int j = 0; j < w; j++) p[j] += d[j];
                }
            }
        }
    }
}
