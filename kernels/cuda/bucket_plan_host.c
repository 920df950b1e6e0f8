/* bucket_plan_host.c — communication bucket boundaries over a flat buffer (see bucket_plan_host.h). */
#include "kernels/cuda/bucket_plan_host.h"
#include "common/error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int add_overflows(size_t a, size_t b) { return a > SIZE_MAX - b; }

/* Rounds x up to a multiple of m (m >= 1); returns 0 on overflow with *out untouched. */
static int round_up(size_t x, size_t m, size_t *out) {
    size_t r = x % m;
    if (r == 0) { *out = x; return 1; }
    if (add_overflows(x, m - r)) return 0;
    *out = x + (m - r);
    return 1;
}

void st_bucket_plan_free(st_bucket_plan *plan) {
    if (!plan) return;
    free(plan->param_offset);
    free(plan->param_bucket);
    free(plan->bucket_start);
    memset(plan, 0, sizeof *plan);
}

int st_bucket_plan_make(st_bucket_plan *plan, const size_t *param_elems, int n_params, size_t bucket_bytes,
                        int world, size_t align) {
    memset(plan, 0, sizeof *plan);
    if (n_params < 0 || (n_params > 0 && !param_elems))
        return st_fail(ST_EINVAL, "bucket plan: bad parameter list (n_params=%d)", n_params);
    if (world < 1) return st_fail(ST_EINVAL, "bucket plan: world size %d < 1", world);
    if (align < 1) return st_fail(ST_EINVAL, "bucket plan: alignment 0");
    if (bucket_bytes < sizeof(float)) return st_fail(ST_EINVAL, "bucket plan: bucket size %zu bytes < 4", bucket_bytes);
    if (align > SIZE_MAX / (size_t)world) return st_fail(ST_EINVAL, "bucket plan: alignment %zu too large", align);
    size_t quantum = (size_t)world * align; /* every bucket length is a multiple of this */
    size_t target = bucket_bytes / sizeof(float);

    plan->n_params = n_params;
    plan->world = world;
    plan->param_offset = calloc(n_params > 0 ? (size_t)n_params : 1, sizeof(size_t));
    plan->param_bucket = calloc(n_params > 0 ? (size_t)n_params : 1, sizeof(int));
    /* at most one bucket per parameter, plus the sentinel */
    plan->bucket_start = calloc((size_t)n_params + 2, sizeof(size_t));
    if (!plan->param_offset || !plan->param_bucket || !plan->bucket_start) {
        st_bucket_plan_free(plan);
        return st_fail(ST_ENOMEM, "bucket plan: out of memory for %d parameters", n_params);
    }

    size_t pos = 0, open_start = 0, open_len = 0;
    int nb = 0;
    for (int i = 0; i < n_params; i++) {
        if (add_overflows(pos, param_elems[i])) goto overflow;
        plan->param_offset[i] = pos;
        plan->param_bucket[i] = nb;
        pos += param_elems[i];
        open_len += param_elems[i];
        if (open_len >= target) { /* close the bucket: pad it to the quantum */
            size_t len;
            if (!round_up(open_len, quantum, &len) || add_overflows(open_start, len)) goto overflow;
            plan->bucket_start[nb++] = open_start;
            open_start += len;
            pos = open_start;
            open_len = 0;
        }
    }
    int trailing_empty = (open_len == 0 && nb > 0); /* params after the last close are all zero-size */
    if (trailing_empty)
        for (int i = 0; i < n_params; i++)
            if (plan->param_bucket[i] == nb) plan->param_bucket[i] = nb - 1;
    if (open_len > 0 || nb == 0) { /* the last, partly filled bucket (or one empty bucket) */
        size_t len;
        if (!round_up(open_len, quantum, &len) || add_overflows(open_start, len)) goto overflow;
        if (len == 0) len = quantum; /* an empty plan still gives every rank one (padding) element */
        plan->bucket_start[nb++] = open_start;
        open_start += len;
    }
    plan->bucket_start[nb] = open_start;
    plan->n_buckets = nb;
    plan->total = open_start;
    plan->shard_total = open_start / (size_t)world;
    return 0;

overflow:
    st_bucket_plan_free(plan);
    return st_fail(ST_EINVAL, "bucket plan: parameter sizes overflow the flat buffer");
}

size_t st_bucket_len(const st_bucket_plan *plan, int b) {
    if (b < 0 || b >= plan->n_buckets) return 0;
    return plan->bucket_start[b + 1] - plan->bucket_start[b];
}

size_t st_bucket_shard_len(const st_bucket_plan *plan, int b) { return st_bucket_len(plan, b) / (size_t)plan->world; }

size_t st_bucket_shard_start(const st_bucket_plan *plan, int b, int rank) {
    if (b < 0 || b >= plan->n_buckets || rank < 0 || rank >= plan->world) return plan->total;
    return plan->bucket_start[b] + (size_t)rank * st_bucket_shard_len(plan, b);
}
