/* dataset.c — dataset file read/write (serial HDF5) and validation; the packers live in dataset_pack.c.
 * See dataset.h for the layout and memory ownership. */
#include "worker/dataset.h"
#include "worker/dataset_h5.h"
#include "common/error.h"
#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Deflate never expands data more than ~1032:1; a dataset claiming much more than that relative to
 * the bytes it stores is a corrupt header, and we refuse it before allocating anything. */
#define ST_MAX_INFLATION 2048

uint64_t st_dataset_checksum(const st_dataset *ds) {
    uint64_t h = st_fnv1a(ST_FNV_INIT, ds->tokens, ds->n_tokens * sizeof(uint32_t));
    return st_fnv1a(h, ds->loss_mask, ds->n_tokens);
}

uint64_t st_dataset_masked_tokens(const st_dataset *ds) {
    uint64_t n = 0;
    for (uint64_t i = 0; i < ds->n_tokens; i++) n += ds->loss_mask[i] == 0;
    return n;
}

void st_dataset_free(st_dataset *ds) {
    if (!ds) return;
    free(ds->tokens);
    free(ds->loss_mask);
    free(ds->doc_offsets);
    memset(ds, 0, sizeof *ds);
}

int st_dataset_validate(const st_dataset *ds, const char *what) {
    if (ds->n_tokens == 0 || !ds->tokens) return st_fail(ST_EFORMAT, "%s: dataset has no tokens", what);
    if (ds->n_docs == 0 || !ds->doc_offsets) return st_fail(ST_EFORMAT, "%s: dataset has no documents", what);
    if (!ds->loss_mask) return st_fail(ST_EFORMAT, "%s: dataset has no loss mask", what);
    if (ds->vocab_size <= 0 || ds->vocab_size > ((int64_t)1 << 32))
        return st_fail(ST_EFORMAT, "%s: vocab_size %lld is out of range (1..2^32)", what, (long long)ds->vocab_size);
    if (ds->eos_id < -1 || ds->eos_id >= ds->vocab_size)
        return st_fail(ST_EFORMAT, "%s: eos_id %lld is not -1 or below vocab_size %lld", what,
                       (long long)ds->eos_id, (long long)ds->vocab_size);
    const uint64_t *off = ds->doc_offsets;
    if (off[0] != 0)
        return st_fail(ST_EFORMAT, "%s: /doc_offsets[0] = %llu, expected 0", what, (unsigned long long)off[0]);
    for (uint64_t d = 0; d < ds->n_docs; d++)
        if (off[d + 1] < off[d])
            return st_fail(ST_EFORMAT, "%s: /doc_offsets is not monotone at index %llu (%llu after %llu)", what,
                           (unsigned long long)(d + 1), (unsigned long long)off[d + 1], (unsigned long long)off[d]);
    if (off[ds->n_docs] != ds->n_tokens)
        return st_fail(ST_EFORMAT, "%s: last /doc_offsets entry is %llu but /tokens has %llu entries", what,
                       (unsigned long long)off[ds->n_docs], (unsigned long long)ds->n_tokens);
    for (uint64_t i = 0; i < ds->n_tokens; i++) {
        if ((int64_t)ds->tokens[i] >= ds->vocab_size)
            return st_fail(ST_EFORMAT, "%s: /tokens[%llu] = %u is not below vocab_size %lld", what,
                           (unsigned long long)i, ds->tokens[i], (long long)ds->vocab_size);
        if (ds->loss_mask[i] > 1)
            return st_fail(ST_EFORMAT, "%s: /loss_mask[%llu] = %u is not 0 or 1", what, (unsigned long long)i,
                           ds->loss_mask[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------- reading */

/* Reads the 1-D unsigned integer dataset `name` of element size `elem` into a new buffer.
 * Returns 1 when the dataset does not exist (the caller decides if that is an error). */
static int read_array(hid_t file, const char *path, const char *name, size_t elem, hid_t mem_type,
                      off_t file_size, uint64_t *count, void **out) {
    *out = NULL;
    htri_t exists = H5Lexists(file, name, H5P_DEFAULT);
    if (exists < 0) return st_fail(ST_EFORMAT, "%s: cannot look up %s (corrupt file?)", path, name);
    if (exists == 0) return 1;
    int rc = 0;
    hid_t d = -1, type = -1, space = -1;
    void *buf = NULL;
    d = H5Dopen2(file, name, H5P_DEFAULT);
    if (d < 0) { rc = st_fail(ST_EFORMAT, "%s: %s is not a readable dataset", path, name); goto done; }
    type = H5Dget_type(d);
    if (type < 0 || H5Tget_class(type) != H5T_INTEGER || H5Tget_size(type) != elem ||
        H5Tget_sign(type) != H5T_SGN_NONE) {
        rc = st_fail(ST_EFORMAT, "%s: %s has the wrong type (expected uint%zu)", path, name, elem * 8);
        goto done;
    }
    space = H5Dget_space(d);
    hsize_t dims[1] = {0};
    if (space < 0 || H5Sget_simple_extent_type(space) != H5S_SIMPLE || H5Sget_simple_extent_ndims(space) != 1 ||
        H5Sget_simple_extent_dims(space, dims, NULL) != 1) {
        rc = st_fail(ST_EFORMAT, "%s: %s must be one-dimensional", path, name);
        goto done;
    }
    if (dims[0] > (hsize_t)(SIZE_MAX / 2) / elem) {
        rc = st_fail(ST_EFORMAT, "%s: %s claims %llu elements, too many", path, name, (unsigned long long)dims[0]);
        goto done;
    }
    size_t bytes = (size_t)dims[0] * elem;
    if (bytes > 0) {
        /* Never trust the declared length: the data must actually be in the file. */
        hsize_t stored = H5Dget_storage_size(d);
        if (stored == 0 || stored > (hsize_t)file_size) {
            rc = st_fail(ST_EFORMAT, "%s: %s is truncated (%llu bytes stored, file has %lld)", path, name,
                         (unsigned long long)stored, (long long)file_size);
            goto done;
        }
        /* Without filters (contiguous, compact, or plain chunked layout) every byte is stored as is:
         * HDF5 1.10 would otherwise read a short compact buffer past its end (found by fuzzing). */
        hid_t dcpl = H5Dget_create_plist(d);
        int n_filters = dcpl >= 0 ? H5Pget_nfilters(dcpl) : -1;
        if (dcpl >= 0) H5Pclose(dcpl);
        if (n_filters < 0 || (n_filters == 0 && stored < bytes)) {
            rc = st_fail(ST_EFORMAT, "%s: %s claims %llu elements but stores only %llu bytes (truncated or corrupt)",
                         path, name, (unsigned long long)dims[0], (unsigned long long)stored);
            goto done;
        }
        if (bytes / ST_MAX_INFLATION > stored) {
            rc = st_fail(ST_EFORMAT, "%s: %s claims %llu elements but stores only %llu bytes (corrupt)", path, name,
                         (unsigned long long)dims[0], (unsigned long long)stored);
            goto done;
        }
    }
    buf = malloc(bytes ? bytes : 1);
    if (!buf) { rc = st_fail(ST_ENOMEM, "%s: out of memory reading %s (%zu bytes)", path, name, bytes); goto done; }
    if (bytes > 0 && H5Dread(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        rc = st_fail(ST_EFORMAT, "%s: cannot read %s (file truncated or corrupt)", path, name);
        goto done;
    }
    *count = dims[0];
    *out = buf;
    buf = NULL;
done:
    free(buf);
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (d >= 0) H5Dclose(d);
    return rc;
}

/* Reads an integer scalar attribute of the root group; returns 1 when absent. */
static int read_int_attr(hid_t root, const char *path, const char *name, int64_t *value) {
    htri_t exists = H5Aexists(root, name);
    if (exists < 0) return st_fail(ST_EFORMAT, "%s: cannot look up attribute %s (corrupt file?)", path, name);
    if (exists == 0) return 1;
    int rc = 0;
    hid_t a = H5Aopen(root, name, H5P_DEFAULT), type = -1, space = -1;
    if (a < 0) { rc = st_fail(ST_EFORMAT, "%s: cannot open attribute %s", path, name); goto done; }
    type = H5Aget_type(a);
    space = H5Aget_space(a);
    if (type < 0 || H5Tget_class(type) != H5T_INTEGER || space < 0 || H5Sget_simple_extent_npoints(space) != 1) {
        rc = st_fail(ST_EFORMAT, "%s: attribute %s must be a single integer", path, name);
        goto done;
    }
    if (H5Aread(a, H5T_NATIVE_INT64, value) < 0)
        rc = st_fail(ST_EFORMAT, "%s: cannot read attribute %s", path, name);
done:
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (a >= 0) H5Aclose(a);
    return rc;
}

static int load_contents(hid_t file, const char *path, off_t file_size, st_dataset *ds) {
    uint64_t n_mask = 0, n_off = 0;
    int rc = read_array(file, path, "/tokens", 4, H5T_NATIVE_UINT32, file_size, &ds->n_tokens, (void **)&ds->tokens);
    if (rc == 1) return st_fail(ST_EFORMAT, "%s: missing /tokens", path);
    if (rc < 0) return rc;
    rc = read_array(file, path, "/doc_offsets", 8, H5T_NATIVE_UINT64, file_size, &n_off, (void **)&ds->doc_offsets);
    if (rc == 1) return st_fail(ST_EFORMAT, "%s: missing /doc_offsets", path);
    if (rc < 0) return rc;
    if (n_off < 2) return st_fail(ST_EFORMAT, "%s: /doc_offsets has %llu entries, needs at least 2", path,
                                  (unsigned long long)n_off);
    ds->n_docs = n_off - 1;
    rc = read_array(file, path, "/loss_mask", 1, H5T_NATIVE_UINT8, file_size, &n_mask, (void **)&ds->loss_mask);
    if (rc < 0) return rc;
    if (rc == 1) { /* absent: every token is a target */
        ds->loss_mask = malloc(ds->n_tokens ? ds->n_tokens : 1);
        if (!ds->loss_mask) return st_fail(ST_ENOMEM, "%s: out of memory for the loss mask", path);
        memset(ds->loss_mask, 1, ds->n_tokens);
    } else if (n_mask != ds->n_tokens) {
        return st_fail(ST_EFORMAT, "%s: /loss_mask has %llu entries but /tokens has %llu", path,
                       (unsigned long long)n_mask, (unsigned long long)ds->n_tokens);
    }
    hid_t root = H5Gopen2(file, "/", H5P_DEFAULT);
    if (root < 0) return st_fail(ST_EFORMAT, "%s: cannot open the root group", path);
    rc = read_int_attr(root, path, "vocab_size", &ds->vocab_size);
    if (rc == 1) rc = st_fail(ST_EFORMAT, "%s: missing root attribute vocab_size", path);
    if (rc == 0) {
        ds->eos_id = -1;
        rc = read_int_attr(root, path, "eos_id", &ds->eos_id);
        if (rc == 1) rc = 0; /* optional: no EOS */
    }
    H5Gclose(root);
    return rc;
}

static int dataset_load(const char *path, st_dataset *ds);

int st_dataset_load(const char *path, st_dataset *ds) {
    st_h5_lock(); /* a background checkpoint write may be running (common/util.h) */
    int rc = dataset_load(path, ds);
    st_h5_unlock();
    return rc;
}

static int dataset_load(const char *path, st_dataset *ds) {
    memset(ds, 0, sizeof *ds);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL); /* one line of our own instead of HDF5's error stack */
    if (strlen(path) >= sizeof ds->path) return st_fail(ST_EINVAL, "dataset path too long: %.100s...", path);
    struct stat st;
    if (stat(path, &st) != 0) return st_fail(ST_EIO, "cannot open dataset %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return st_fail(ST_EIO, "dataset %s is not a regular file", path);
    if (H5Fis_hdf5(path) <= 0) return st_fail(ST_EFORMAT, "%s is not an HDF5 file", path);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return st_fail(ST_EFORMAT, "%s: cannot open as HDF5 (corrupt or truncated)", path);
    int rc = load_contents(file, path, st.st_size, ds);
    H5Fclose(file);
    if (rc == 0) rc = st_dataset_validate(ds, path);
    if (rc < 0) {
        st_dataset_free(ds);
        return rc;
    }
    ds->checksum = st_dataset_checksum(ds);
    snprintf(ds->path, sizeof ds->path, "%s", path);
    return 0;
}

/* ---------------------------------------------------------------- writing */

static int write_array(hid_t file, const char *name, hid_t file_type, hid_t mem_type, hsize_t n, const void *data) {
    hsize_t dims[1] = {n}, chunk[1] = {n < 65536 ? n : 65536};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    int ok = space >= 0 && dcpl >= 0 && H5Pset_chunk(dcpl, 1, chunk) >= 0;
    if (ok && H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) ok = H5Pset_deflate(dcpl, 1) >= 0;
    hid_t d = ok ? H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT) : -1;
    ok = d >= 0 && H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0;
    if (d >= 0) H5Dclose(d);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (space >= 0) H5Sclose(space);
    return ok ? 0 : -1;
}

int st_dataset_h5_int_attr(hid_t file, const char *name, int64_t value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = space >= 0 ? H5Acreate2(file, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT) : -1;
    int ok = a >= 0 && H5Awrite(a, H5T_NATIVE_INT64, &value) >= 0;
    if (a >= 0) H5Aclose(a);
    if (space >= 0) H5Sclose(space);
    return ok ? 0 : -1;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int st_dataset_write(const char *path, const st_dataset *ds) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    int rc = st_dataset_validate(ds, path);
    if (rc < 0) return rc;
    char tmp[1100];
    if (snprintf(tmp, sizeof tmp, "%s.partial", path) >= (int)sizeof tmp)
        return st_fail(ST_EINVAL, "output path too long: %.100s...", path);
    hid_t file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) return st_fail(ST_EIO, "cannot create %s", tmp);
    int bad = write_array(file, "/tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, ds->n_tokens, ds->tokens) ||
              write_array(file, "/loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, ds->n_tokens, ds->loss_mask) ||
              write_array(file, "/doc_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, ds->n_docs + 1, ds->doc_offsets) ||
              st_dataset_h5_int_attr(file, "vocab_size", ds->vocab_size) || st_dataset_h5_int_attr(file, "eos_id", ds->eos_id);
    if (H5Fclose(file) < 0) bad = 1;
    if (bad || fsync_path(tmp) != 0) {
        unlink(tmp);
        return st_fail(ST_EIO, "cannot write %s (disk full or not writable?)", tmp);
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return st_fail(ST_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(e));
    }
    return 0;
}
