/* bucket_plan_host.h — how a flat gradient buffer is cut into communication buckets.
 *
 * Plain C, no CUDA: used by the NCCL path and testable anywhere. Parameters are laid out in the given
 * order, whole (a parameter never straddles two buckets, so a bucket can be sent as soon as its last
 * parameter's gradient is complete). A bucket closes once it holds at least `bucket_bytes`; then it is
 * padded with zeros up to a multiple of `world * align` elements so that a reduce-scatter of the bucket
 * gives every rank the same number of elements (its shard of that bucket), and every shard starts
 * `align`-element aligned. Rank r's shard of bucket b is
 *     [bucket_start[b] + r * shard_len(b), + shard_len(b)),  shard_len(b) = bucket_len(b) / world.
 * The plan owns its arrays (malloc'ed); free them with st_bucket_plan_free(). */
#ifndef ST_CUDA_BUCKET_PLAN_HOST_H
#define ST_CUDA_BUCKET_PLAN_HOST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int n_params;
    int n_buckets;
    int world;
    size_t *param_offset;  /* [n_params] element offset of each parameter in the flat buffer */
    int *param_bucket;     /* [n_params] bucket holding each parameter */
    size_t *bucket_start;  /* [n_buckets + 1] element offsets; bucket_start[n_buckets] = total */
    size_t total;          /* padded flat length (a multiple of world) */
    size_t shard_total;    /* elements one rank owns over all buckets = total / world */
} st_bucket_plan;

/* Makes the plan for `n_params` parameters of `param_elems[i]` floats each. bucket_bytes > 0,
 * world >= 1, align >= 1 (elements). Zero-size parameters are allowed (they get an offset, no room).
 * Returns 0, or ST_EINVAL / ST_ENOMEM with st_error() naming the bad argument. */
int st_bucket_plan_make(st_bucket_plan *plan, const size_t *param_elems, int n_params, size_t bucket_bytes,
                        int world, size_t align);
void st_bucket_plan_free(st_bucket_plan *plan);

/* Length of bucket b and the length of each rank's shard of it. */
size_t st_bucket_len(const st_bucket_plan *plan, int b);
size_t st_bucket_shard_len(const st_bucket_plan *plan, int b);
/* Flat offset where rank `rank`'s shard of bucket b starts. */
size_t st_bucket_shard_start(const st_bucket_plan *plan, int b, int rank);

#ifdef __cplusplus
}
#endif
#endif
