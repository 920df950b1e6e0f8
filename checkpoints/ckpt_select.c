/* ckpt_select.c — HDF5 selections for a flat element range of a 1-D or 2-D dataset, shaped so that
 * HDF5 maps them chunk by chunk.
 *
 * Why: when the memory dataspace is 1-D and the file selection 2-D, HDF5 (1.10) cannot tell that the
 * two selections have the same shape and builds its chunk map by visiting every element (a callback
 * per float). That was ~90% of a save and of a load. Here the memory side is a [rows, C] window that
 * holds the very same boxes as the file side, so HDF5 takes its per-chunk path.
 *
 * Memory: the returned dataspace belongs to the caller (H5Sclose). No buffers are allocated here. */
#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"

hid_t st_ckpt_select_range(hid_t fs, int ndim, const int64_t shape[2], uint64_t a, uint64_t b, size_t *lead,
                           size_t *window) {
    st_ckpt_slab slabs[3];
    int n = st_ckpt_range_slabs(ndim, shape, a, b, slabs);
    uint64_t C = ndim == 2 ? (uint64_t)shape[1] : 1;
    if (n == 0) {
        hsize_t one = 1;
        hid_t ms = H5Screate_simple(1, &one, NULL);
        H5Sselect_none(fs);
        H5Sselect_none(ms);
        *lead = 0;
        *window = 0;
        return ms;
    }
    /* rows [r0, r_end) of the dataset hold the range; element a sits `lead` elements into them */
    uint64_t r0 = slabs[0].start[0], r_end = slabs[n - 1].start[0] + slabs[n - 1].count[0];
    hsize_t mdims[2] = {r_end - r0, C};
    hid_t ms = H5Screate_simple(ndim, mdims, NULL);
    for (int k = 0; k < n; k++) {
        hsize_t mstart[2] = {slabs[k].start[0] - r0, slabs[k].start[1]};
        H5Sselect_hyperslab(fs, k ? H5S_SELECT_OR : H5S_SELECT_SET, (const hsize_t *)slabs[k].start, NULL,
                            (const hsize_t *)slabs[k].count, NULL);
        H5Sselect_hyperslab(ms, k ? H5S_SELECT_OR : H5S_SELECT_SET, mstart, NULL, (const hsize_t *)slabs[k].count,
                            NULL);
    }
    *lead = (size_t)(a - r0 * C);
    *window = (size_t)((r_end - r0) * C);
    return ms;
}
