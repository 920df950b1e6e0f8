/* ckpt_read.c — reading checkpoints with plain (non-MPI) HDF5: root attributes, the model tensors,
 * a rank's optimizer range, full verification and listing. Nothing read from the file is trusted:
 * types, ranks and sizes are checked against what the model expects before any buffer is touched. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "worker/qlora.h"

static hid_t open_file(const char *path) {
    st_ckpt_h5_quiet();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) st_fail(ST_EFORMAT, "checkpoint %s: cannot open as HDF5 (missing, truncated or not HDF5): %s", path,
                       st_ckpt_h5_reason());
    return f;
}

/* ---------------- attributes ---------------- */

static int attr_num(hid_t obj, const char *name, hid_t mem_type, void *out, int required, const char *path) {
    if (H5Aexists(obj, name) <= 0)
        return required ? st_fail(ST_EFORMAT, "checkpoint %s: attribute '%s' is missing", path, name) : 1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    hid_t sp = a >= 0 ? H5Aget_space(a) : -1;
    int ok = a >= 0 && sp >= 0 && H5Sget_simple_extent_npoints(sp) == 1 && H5Aread(a, mem_type, out) >= 0;
    if (sp >= 0) H5Sclose(sp);
    if (a >= 0) H5Aclose(a);
    return ok ? 0 : st_fail(ST_EFORMAT, "checkpoint %s: attribute '%s' is not a number", path, name);
}

/* A fixed-length string attribute, malloc'ed into *out (NULL when absent and not required). */
static int attr_text(hid_t obj, const char *name, char **out, int required, const char *path) {
    *out = NULL;
    if (H5Aexists(obj, name) <= 0)
        return required ? st_fail(ST_EFORMAT, "checkpoint %s: attribute '%s' is missing", path, name) : 0;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT), t = a >= 0 ? H5Aget_type(a) : -1;
    int rc = 0;
    if (t < 0 || H5Tget_class(t) != H5T_STRING || H5Tis_variable_str(t) > 0) {
        rc = st_fail(ST_EFORMAT, "checkpoint %s: attribute '%s' is not a fixed-length string", path, name);
    } else {
        size_t n = H5Tget_size(t);
        *out = calloc(n + 1, 1);
        if (!*out) rc = st_fail(ST_ENOMEM, "out of memory");
        else if (H5Aread(a, t, *out) < 0) rc = st_fail(ST_EFORMAT, "checkpoint %s: reading attribute '%s'", path, name);
    }
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    if (rc) { free(*out); *out = NULL; }
    return rc;
}

/* A 1-D numeric attribute of at most `max` elements, malloc'ed. */
static int attr_array(hid_t obj, const char *name, hid_t mem_type, size_t elem, size_t max, void **out, size_t *n,
                      const char *path) {
    *out = NULL;
    *n = 0;
    if (H5Aexists(obj, name) <= 0) return 0;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT), sp = a >= 0 ? H5Aget_space(a) : -1;
    hssize_t k = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    int rc = 0;
    if (k < 0 || (size_t)k > max) rc = st_fail(ST_EFORMAT, "checkpoint %s: attribute '%s' has a bad size", path, name);
    else if (!(*out = calloc((size_t)k + 1, elem))) rc = st_fail(ST_ENOMEM, "out of memory");
    else if (k > 0 && H5Aread(a, mem_type, *out) < 0) rc = st_fail(ST_EFORMAT, "checkpoint %s: reading '%s'", path, name);
    if (sp >= 0) H5Sclose(sp);
    if (a >= 0) H5Aclose(a);
    if (rc) { free(*out); *out = NULL; } else *n = (size_t)k;
    return rc;
}

void st_ckpt_info_free(st_ckpt_info *info) {
    free(info->job_spec);
    free(info->model_config);
    free(info->loader_state);
    free(info->task_names);
    free(info->task_checksums);
    free(info->task_weighting);
    memset(info, 0, sizeof *info);
}

int st_ckpt_read_info(const char *path, st_ckpt_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->path, sizeof info->path, "%s", path);
    hid_t f = open_file(path);
    if (f < 0) return ST_EFORMAT;
    char *format = NULL;
    int64_t version = 0, stage = 0, world = 0, n_tasks = 0;
    int rc = attr_text(f, "format", &format, 1, path);
    if (!rc && strcmp(format, ST_CKPT_FORMAT) != 0)
        rc = st_fail(ST_EFORMAT, "checkpoint %s: format is '%s', not '%s'", path, format, ST_CKPT_FORMAT);
    free(format);
    if (!rc) rc = attr_num(f, "version", H5T_NATIVE_INT64, &version, 1, path);
    if (!rc && (version < 1 || version > ST_CKPT_VERSION))
        rc = st_fail(ST_EFORMAT, "checkpoint %s: version %lld is not supported (this build reads 1..%d)", path,
                     (long long)version, ST_CKPT_VERSION);
    info->version = (int)version;
    if (!rc) rc = attr_num(f, "step", H5T_NATIVE_INT64, &info->step, 1, path);
    if (!rc) rc = attr_num(f, "tokens_seen", H5T_NATIVE_UINT64, &info->tokens_seen, 1, path);
    if (!rc) rc = attr_num(f, "stage", H5T_NATIVE_INT64, &stage, 1, path);
    if (!rc) rc = attr_num(f, "world_size", H5T_NATIVE_INT64, &world, 1, path);
    if (!rc) rc = attr_num(f, "last_loss", H5T_NATIVE_DOUBLE, &info->last_loss, 1, path);
    if (!rc && (info->step < 0 || stage < 0 || stage > 1 << 20 || world < 1 || world > 1 << 24))
        rc = st_fail(ST_EFORMAT, "checkpoint %s: step/stage/world_size out of range", path);
    info->stage = (int)stage;
    info->world_size = (int)world;
    if (!rc) rc = attr_num(f, "base_checksum", H5T_NATIVE_UINT64, &info->base_checksum, 0, path) < 0 ? ST_EFORMAT : 0;
    if (!rc) rc = attr_text(f, "job_spec", &info->job_spec, 1, path);
    if (!rc) rc = attr_text(f, "model_config", &info->model_config, 1, path);
    size_t n;
    if (!rc) rc = attr_array(f, "loader_state", H5T_NATIVE_UINT64, 8, 1u << 24, (void **)&info->loader_state,
                             &info->loader_words, path);
    if (!rc) rc = attr_num(f, "n_tasks", H5T_NATIVE_INT64, &n_tasks, 0, path) < 0 ? ST_EFORMAT : 0;
    if (!rc && (n_tasks < 0 || n_tasks > 65535)) rc = st_fail(ST_EFORMAT, "checkpoint %s: n_tasks out of range", path);
    info->n_tasks = (int)n_tasks;
    if (!rc && n_tasks > 0) {
        rc = attr_array(f, "task_checksums", H5T_NATIVE_UINT64, 8, (size_t)n_tasks, (void **)&info->task_checksums, &n, path);
        if (!rc && n != (size_t)n_tasks) rc = st_fail(ST_EFORMAT, "checkpoint %s: task_checksums has %zu entries", path, n);
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, 128);
        H5Tset_strpad(t, H5T_STR_NULLTERM);
        if (!rc) rc = attr_array(f, "task_names", t, 128, (size_t)n_tasks, (void **)&info->task_names, &n, path);
        H5Tclose(t);
        if (!rc && n != (size_t)n_tasks) rc = st_fail(ST_EFORMAT, "checkpoint %s: task_names has %zu entries", path, n);
    }
    if (!rc) {
        rc = attr_array(f, "task_weighting", H5T_NATIVE_DOUBLE, 8, 1u << 20, (void **)&info->task_weighting, &n, path);
        info->task_weighting_len = (int)n;
    }
    H5Fclose(f);
    if (rc) st_ckpt_info_free(info);
    return rc;
}

/* ---------------- tensors ---------------- */

/* Opens dataset `name` and checks it is float32 of exactly the expected shape. */
static hid_t open_tensor(hid_t f, const char *name, int ndim, const int64_t *shape, const char *path, int *err) {
    *err = ST_ESHAPE;
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) {
        st_fail(ST_ESHAPE, "checkpoint %s: tensor %s is missing (a different model?)", path, name);
        return -1;
    }
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    *err = ST_ECORRUPT;
    if (d < 0) { st_fail(ST_ECORRUPT, "checkpoint %s: cannot open %s: %s", path, name, st_ckpt_h5_reason()); return -1; }
    hid_t t = H5Dget_type(d), sp = H5Dget_space(d);
    hsize_t dims[H5S_MAX_RANK];
    int nd = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    int ok = t >= 0 && H5Tget_class(t) == H5T_FLOAT && H5Tget_size(t) == 4;
    int same = nd == ndim && nd >= 1 && nd <= 2 && H5Sget_simple_extent_dims(sp, dims, NULL) == nd;
    for (int k = 0; same && k < nd; k++) same = dims[k] == (hsize_t)shape[k];
    if (t >= 0) H5Tclose(t);
    if (!ok || !same) {
        char got[64] = "?";
        if (nd == 1) snprintf(got, sizeof got, "[%llu]", (unsigned long long)dims[0]);
        else if (nd == 2) snprintf(got, sizeof got, "[%llu, %llu]", (unsigned long long)dims[0], (unsigned long long)dims[1]);
        *err = ok ? ST_ESHAPE : ST_EFORMAT;
        if (!ok) st_fail(ST_EFORMAT, "checkpoint %s: tensor %s is not float32", path, name);
        else if (ndim == 1) st_fail(ST_ESHAPE, "checkpoint %s: tensor %s has shape %s, the model expects [%lld]", path, name, got, (long long)shape[0]);
        else st_fail(ST_ESHAPE, "checkpoint %s: tensor %s has shape %s, the model expects [%lld, %lld]", path, name, got,
                     (long long)shape[0], (long long)shape[1]);
        if (sp >= 0) H5Sclose(sp);
        H5Dclose(d);
        return -1;
    }
    H5Sclose(sp);
    return d;
}

/* Reads the flat range [a, b) into out[0..b-a). Read failures (Fletcher32 in older files, a range past
 * the end of a truncated file) become ST_ECORRUPT. A range
 * that is not whole rows goes through a window of whole rows (st_ckpt_select_range says why). */
static int read_range(hid_t d, int ndim, const int64_t *shape, uint64_t a, uint64_t b, float *out, const char *name,
                      const char *path) {
    if (a >= b) return 0;
    hid_t fs = H5Dget_space(d);
    size_t lead, window, count = b - a;
    hid_t ms = st_ckpt_select_range(fs, ndim, shape, a, b, &lead, &window);
    float *bounce = lead == 0 && window == count ? NULL : malloc(window * sizeof(float));
    herr_t r = -1;
    if (lead == 0 && window == count) r = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, out);
    else if (bounce) r = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, bounce);
    H5Sclose(ms);
    H5Sclose(fs);
    if (bounce && r >= 0) memcpy(out, bounce + lead, count * sizeof(float));
    int missing = !bounce && !(lead == 0 && window == count);
    free(bounce);
    if (missing) return st_fail(ST_ENOMEM, "checkpoint %s: out of memory reading %s", path, name);
    if (r < 0) return st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s is corrupt or truncated: %s", path, name, st_ckpt_h5_reason());
    return 0;
}

static int checksum_attr(hid_t d, uint64_t *sum, const char *name, const char *path) {
    int rc = attr_num(d, "checksum", H5T_NATIVE_UINT64, sum, 1, path);
    return rc ? st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s has no readable checksum attribute", path, name) : 0;
}

/* /model/<name> of parameter p, whole, into dst: its shape and its checksum attribute verified. */
static int read_verified(hid_t f, const st_param *p, float *dst, const char *path) {
    char name[160];
    snprintf(name, sizeof name, "model/%s", p->name);
    int rc = 0;
    hid_t d = open_tensor(f, name, p->ndim, p->shape, path, &rc);
    if (d < 0) return rc ? rc : ST_EFORMAT;
    uint64_t want = 0;
    rc = checksum_attr(d, &want, name, path);
    if (!rc) rc = read_range(d, p->ndim, p->shape, 0, p->numel, dst, name, path);
    if (!rc && st_ckpt_checksum(dst, 0, p->numel) != want)
        rc = st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s fails its checksum", path, name);
    H5Dclose(d);
    return rc;
}

int st_ckpt_skips_tensor(const st_model *m, int i) {
    int k = m->params[i].kind;
    return (m->lora || m->prompt) && k != ST_MOD_LORA && k != ST_MOD_PROMPT;
}

uint64_t st_ckpt_base_checksum(const st_model *m, const uint64_t *sums, size_t stride) {
    uint64_t h = 0;
    for (int i = 0; i < m->n_params; i++)
        if (st_ckpt_skips_tensor(m, i) && !st_qlora_holds(m, i)) h = h * 0x100000001b3ull + sums[(size_t)i * stride] + (uint64_t)i;
    return h;
}

/* Parameter i's checksum summed a 1 Mi-float piece at a time from the model's own weights (widened where held
 * in bf16 only): what check_base needs when the caller keeps no image of the base. */
static void sum_own(const st_model *m, int i, float *piece, uint64_t *sum) {
    const st_param *p = &m->params[i];
    const size_t chunk = (size_t)1 << 20;
    for (size_t a = 0; a < p->numel; a += chunk) {
        size_t n = p->numel - a < chunk ? p->numel - a : chunk;
        if (st_model_fp32_dropped(m, i)) st_model_param_fp32(m, i, a, n, piece);
        else m->be->copy_to_host(piece, st_model_param_weights(m, i) + a, n * sizeof(float));
        *sum += st_ckpt_checksum(piece, a, n); /* partial sums add up (ckpt.h) */
    }
}

/* A LoRA checkpoint holds no base tensors: host_weights gets the model's own base (the caller copies
 * the whole buffer back), whose checksum must be the one the checkpoint was trained on. host_weights NULL:
 * the base is only summed, a piece at a time (st_ckpt_load_adapters). */
static int check_base(hid_t f, const st_model *m, float *host_weights, const char *path) {
    uint64_t want = 0;
    int rc = attr_num(f, "adapter_base_checksum", H5T_NATIVE_UINT64, &want, 1, path);
    if (rc) return st_fail(ST_EFORMAT, "checkpoint %s holds no adapter_base_checksum: it is not a LoRA checkpoint", path);
    uint64_t *sums = calloc((size_t)m->n_params + 1, sizeof *sums);
    float *piece = host_weights ? NULL : malloc(((size_t)1 << 20) * sizeof(float));
    if (!sums || (!host_weights && !piece)) {
        free(sums);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (!st_ckpt_skips_tensor(m, i) || st_qlora_holds(m, i)) continue; /* QLoRA scratch: the trainer's own check */
        if (st_qlora_bf16_only(m, i)) { sums[i] = st_qlora_sum(m, i); continue; } /* no fp32 values: the load's sum */
        st_model_acquire(m, i, i + 1); /* ZeRO-3 shards the frozen base: one tensor gathered at a time */
        if (!host_weights) sum_own(m, i, piece, &sums[i]);
        else if (st_model_fp32_dropped(m, i)) /* held in bf16 only (a bf16 source): its fp32 value widened, exactly */
            st_model_param_fp32_host(m, i, 0, p->numel, host_weights + p->offset);
        else
            m->be->copy_to_host(host_weights + p->offset, st_model_param_weights(m, i), p->numel * sizeof(float));
        st_model_release(m, i, i + 1);
        if (host_weights) sums[i] = st_ckpt_checksum(host_weights + p->offset, 0, p->numel);
    }
    free(piece);
    uint64_t got = st_ckpt_base_checksum(m, sums, 1);
    free(sums);
    if (got != want)
        return st_fail(ST_ECORRUPT, "checkpoint %s was trained on another base model (adapter_base_checksum differs from "
                                    "model.path's weights)", path);
    return 0;
}

static int load_model(const char *path, const st_model *m, float *host_weights, int base_image) {
    hid_t f = open_file(path);
    if (f < 0) return ST_EFORMAT;
    int rc = 0;
    if (m->lora || m->prompt) rc = check_base(f, m, base_image ? host_weights : NULL, path);
    for (int i = 0; !rc && i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (st_ckpt_skips_tensor(m, i)) continue; /* check_base kept the model's own */
        rc = read_verified(f, p, host_weights + p->offset, path);
    }
    H5Fclose(f);
    return rc;
}

int st_ckpt_load_model(const char *path, const st_model *m, float *host_weights) {
    return load_model(path, m, host_weights, 1);
}

/* Parameter i's /model tensor through pieces of whole rows (about 1 Mi floats, read into `piece`): its shape, and
 * its checksum summed piece by piece, with read_verified's messages. into NULL: only checked. Else parameter i is
 * held in bf16 only and the pieces go into its bf16 copy (exact: they are bf16 values), or, from the first piece
 * that is not, into its fp32 place got back (st_model_fp32_regain), as the whole-image resume leaves it. */
static int check_tensor(hid_t f, st_model *into, const st_model *m, int i, float *piece, size_t piece_floats,
                        const char *path) {
    const st_param *p = &m->params[i];
    int held = into != NULL;
    char name[160];
    snprintf(name, sizeof name, "model/%s", p->name);
    int rc = 0;
    hid_t d = open_tensor(f, name, p->ndim, p->shape, path, &rc);
    if (d < 0) return rc ? rc : ST_EFORMAT;
    uint64_t want = 0, got = 0;
    rc = checksum_attr(d, &want, name, path);
    size_t row = p->ndim == 2 ? (size_t)p->shape[1] : 1, step = row ? piece_floats / row * row : piece_floats;
    if (step == 0) step = row; /* a row wider than the piece: the caller sized the piece for it */
    for (size_t a = 0; !rc && a < p->numel; a += step) {
        size_t n = p->numel - a < step ? p->numel - a : step;
        rc = read_range(d, p->ndim, p->shape, a, a + n, piece, name, path);
        if (rc) break;
        got += st_ckpt_checksum(piece, a, n); /* partial sums add up (ckpt.h) */
        if (held && !st_model_values_bf16(piece, n)) {
            st_model_fp32_regain(into, i, a);
            held = 0;
        }
        if (held) into->be->to_bf16(into->weights_bf16 + p->offset + a, piece, n);
        else if (into) memcpy(into->weights + p->offset + a, piece, n * sizeof(float));
    }
    if (!rc && got != want) rc = st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s fails its checksum", path, name);
    H5Dclose(d);
    return rc;
}

static size_t piece_floats(const st_model *m) {
    size_t piece = (size_t)1 << 20;
    for (int i = 0; i < m->n_params; i++) /* at least one whole row */
        if (m->params[i].ndim == 2 && (size_t)m->params[i].shape[1] > piece) piece = (size_t)m->params[i].shape[1];
    return piece;
}

int st_ckpt_check_model(const char *path, const st_model *m) {
    if (m->lora || m->prompt) return st_fail(ST_EINVAL, "checkpoint %s: st_ckpt_check_model on a model with adapters", path);
    size_t piece = piece_floats(m);
    float *buf = malloc(piece * sizeof(float));
    if (!buf) return st_fail(ST_ENOMEM, "out of memory");
    hid_t f = open_file(path);
    int rc = f < 0 ? ST_EFORMAT : 0;
    for (int i = 0; !rc && i < m->n_params; i++) rc = check_tensor(f, NULL, m, i, buf, piece, path);
    if (f >= 0) H5Fclose(f);
    free(buf);
    return rc;
}

int st_ckpt_load_model_in_place(const char *path, st_model *m) {
    if (!m->be->host_memory || m->lora || m->prompt)
        return st_fail(ST_EINVAL, "checkpoint %s: st_ckpt_load_model_in_place needs host weights and no adapters", path);
    size_t piece = piece_floats(m);
    float *buf = NULL;
    for (int i = 0; !buf && i < m->n_params; i++)
        if (st_model_fp32_dropped(m, i) && (size_t)m->params[i].offset >= m->n_w16 && !(buf = malloc(piece * sizeof(float))))
            return st_fail(ST_ENOMEM, "out of memory");
    hid_t f = open_file(path);
    int rc = f < 0 ? ST_EFORMAT : 0;
    for (int i = 0; !rc && i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if ((size_t)p->offset < m->n_w16) continue; /* QLoRA's bf16-only part: no fp32 place */
        if (st_model_fp32_dropped(m, i)) rc = check_tensor(f, m, m, i, buf, piece, path); /* its bf16 copy */
        else rc = read_verified(f, p, m->weights + p->offset, path);
    }
    if (f >= 0) H5Fclose(f);
    free(buf);
    return rc;
}

int st_ckpt_load_adapters(const char *path, const st_model *m, float *host_weights) {
    if (!m->lora && !m->prompt) return st_fail(ST_EINVAL, "checkpoint %s: st_ckpt_load_adapters on a model without adapters", path);
    return load_model(path, m, host_weights, 0);
}

/* A tensor's optimizer step: 0..max_step (the checkpoint's own step; -1 = up to INT_MAX). */
static int read_step_attr(hid_t d, int *step, int64_t max_step, const char *name, const char *path) {
    int64_t s = 0;
    if (max_step < 0 || max_step > INT_MAX) max_step = INT_MAX;
    int rc = attr_num(d, "step", H5T_NATIVE_INT64, &s, 1, path);
    if (!rc && (s < 0 || s > max_step))
        rc = st_fail(ST_ECORRUPT, "checkpoint %s: %s step %lld out of range (0..%lld)", path, name, (long long)s,
                     (long long)max_step);
    *step = rc ? 0 : (int)s;
    return rc;
}

int st_ckpt_load_optim(MPI_Comm comm, const char *path, const st_model *m, size_t lo, size_t hi, float *m_out,
                       float *v_out, int *param_step) {
    int rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    memset(m_out, 0, (hi - lo) * sizeof(float));
    memset(v_out, 0, (hi - lo) * sizeof(float));
    uint64_t *sums = calloc(4 * (size_t)m->n_params + 1, sizeof(uint64_t)); /* got m, got v, want m, want v */
    hid_t f = open_file(path);
    int rc = !sums ? st_fail(ST_ENOMEM, "out of memory") : f < 0 ? ST_EFORMAT : 0;
    /* checksums are verified over the rank's even share, which lies inside [lo, hi) at every stage */
    uint64_t shard = m->grad_alloc / (uint64_t)world, share_lo = shard * (uint64_t)rank, share_hi = share_lo + shard;
    char name[200];
    for (int i = 0; !rc && i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0) continue;
        uint64_t s = (uint64_t)p->grad_offset, e = s + p->numel;
        uint64_t a = s > lo ? s : lo, b = e < hi ? e : hi;
        for (int which = 0; !rc && which < 2; which++) {
            snprintf(name, sizeof name, "optim/%s/%s", p->name, which ? "exp_avg_sq" : "exp_avg");
            hid_t d = open_tensor(f, name, p->ndim, p->shape, path, &rc);
            if (d < 0) {
                char why[600];
                snprintf(why, sizeof why, "%s", st_error());
                if (rc == ST_ESHAPE) st_fail(ST_ESHAPE, "%s (are finetune settings different from the saved run's?)", why);
                break;
            }
            rc = 0;
            float *out = which ? v_out : m_out;
            uint64_t want;
            rc = checksum_attr(d, &want, name, path);
            if (!rc) rc = read_step_attr(d, &param_step[i], -1, name, path);
            if (!rc && a < b) rc = read_range(d, p->ndim, p->shape, a - s, b - s, out + (a - lo), name, path);
            uint64_t va = s > share_lo ? s : share_lo, vb = e < share_hi ? e : share_hi;
            if (!rc && va < vb) sums[4 * i + which] = st_ckpt_checksum(out + (va - lo), va - s, vb - va);
            sums[4 * i + 2 + which] = rank == 0 ? want : 0;
            H5Dclose(d);
        }
    }
    if (f >= 0) H5Fclose(f);
    /* agree on errors first (the lowest failing rank's message wins), then compare checksums */
    int mine[2] = {rc ? rank : world, 0}, first[2];
    MPI_Allreduce(mine, first, 1, MPI_2INT, MPI_MINLOC, comm);
    if (first[0] != world) {
        int code = rc;
        char msg[600];
        snprintf(msg, sizeof msg, "%s", st_error());
        MPI_Bcast(&code, 1, MPI_INT, first[0], comm);
        MPI_Bcast(msg, sizeof msg, MPI_CHAR, first[0], comm);
        free(sums);
        return st_fail(code, "%s", msg);
    }
    MPI_Allreduce(MPI_IN_PLACE, sums, 4 * m->n_params, MPI_UINT64_T, MPI_SUM, comm);
    for (int i = 0; !rc && i < m->n_params; i++) {
        if (m->params[i].grad_offset < 0) continue;
        for (int which = 0; !rc && which < 2; which++)
            if (sums[4 * i + which] != sums[4 * i + 2 + which])
                rc = st_fail(ST_ECORRUPT, "checkpoint %s: tensor optim/%s/%s fails its checksum", path, m->params[i].name,
                             which ? "exp_avg_sq" : "exp_avg");
    }
    free(sums);
    return rc;
}

/* ---------------- verify / list (serial tools) ---------------- */

typedef struct {
    const char *path;
    int n, rc;
    st_ckpt_tensor_fn fn;
    void *ctx;
    int verify;
    int64_t step; /* the checkpoint's step: no tensor's optimizer step may exceed it */
} visit_ctx;

/* What resume will trust beyond the checksum: finite values, non-negative second moments, an
 * optimizer step within the checkpoint's. */
static int verify_values(hid_t d, const float *buf, uint64_t numel, const char *name, const visit_ctx *c) {
    for (uint64_t i = 0; i < numel; i++)
        if (!isfinite(buf[i]))
            return st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s holds a non-finite value (%g at element %llu)", c->path,
                           name, (double)buf[i], (unsigned long long)i);
    size_t len = strlen(name);
    if (len > 11 && !strcmp(name + len - 11, "/exp_avg_sq"))
        for (uint64_t i = 0; i < numel; i++)
            if (buf[i] < 0)
                return st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s holds a negative second moment (%g at element %llu)",
                               c->path, name, (double)buf[i], (unsigned long long)i);
    if (!strncmp(name, "optim/", 6)) {
        int step;
        return read_step_attr(d, &step, c->step, name, c->path);
    }
    return 0;
}

static int verify_dataset(hid_t d, const char *name, const visit_ctx *c) {
    const char *path = c->path;
    hid_t sp = H5Dget_space(d), t = H5Dget_type(d);
    int nd = H5Sget_simple_extent_ndims(sp);
    hsize_t dims[H5S_MAX_RANK];
    int rc = 0;
    if (nd < 1 || nd > 2 || H5Tget_class(t) != H5T_FLOAT || H5Tget_size(t) != 4) {
        rc = st_fail(ST_EFORMAT, "checkpoint %s: tensor %s is not a 1-D/2-D float32 dataset", path, name);
    } else {
        H5Sget_simple_extent_dims(sp, dims, NULL);
        int64_t shape[2] = {(int64_t)dims[0], nd == 2 ? (int64_t)dims[1] : 1};
        uint64_t numel = (uint64_t)shape[0] * (uint64_t)shape[1], want = 0;
        float *buf = numel < (1ULL << 34) ? malloc((numel ? numel : 1) * sizeof(float)) : NULL;
        if (!buf) rc = st_fail(ST_ENOMEM, "checkpoint %s: tensor %s too large to verify", path, name);
        if (!rc) rc = checksum_attr(d, &want, name, path);
        if (!rc) rc = read_range(d, nd, shape, 0, numel, buf, name, path);
        if (!rc && st_ckpt_checksum(buf, 0, numel) != want)
            rc = st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s fails its checksum", path, name);
        if (!rc) rc = verify_values(d, buf, numel, name, c);
        free(buf);
    }
    H5Tclose(t);
    H5Sclose(sp);
    return rc;
}

static herr_t visit(hid_t obj, const char *name, const H5O_info_t *info, void *p) {
    visit_ctx *c = p;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t d = H5Dopen2(obj, name, H5P_DEFAULT);
    if (d < 0) {
        c->rc = st_fail(ST_ECORRUPT, "checkpoint %s: cannot open tensor %s", c->path, name);
        return 1;
    }
    c->n++;
    if (c->verify) c->rc = verify_dataset(d, name, c);
    if (c->fn) {
        hid_t sp = H5Dget_space(d);
        hsize_t dims[H5S_MAX_RANK] = {0};
        int nd = H5Sget_simple_extent_ndims(sp);
        if (nd > 0 && nd <= 2) H5Sget_simple_extent_dims(sp, dims, NULL);
        uint64_t u[2] = {dims[0], dims[1]};
        c->fn(c->ctx, name, nd, u, (uint64_t)H5Dget_storage_size(d));
        H5Sclose(sp);
    }
    H5Dclose(d);
    return c->rc ? 1 : 0;
}

static int walk(const char *path, int verify, st_ckpt_tensor_fn fn, void *ctx, int *n_tensors) {
    st_ckpt_info info;
    int rc = st_ckpt_read_info(path, &info); /* refuses non-checkpoints before walking */
    if (rc) return rc;
    int64_t step = info.step;
    st_ckpt_info_free(&info);
    hid_t f = open_file(path);
    if (f < 0) return ST_EFORMAT;
    visit_ctx c = {path, 0, 0, fn, ctx, verify, step};
    herr_t r = H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, visit, &c);
    H5Fclose(f);
    if (c.rc) return c.rc;
    if (r < 0) return st_fail(ST_ECORRUPT, "checkpoint %s: cannot walk the file: %s", path, st_ckpt_h5_reason());
    if (n_tensors) *n_tensors = c.n;
    return 0;
}

int st_ckpt_verify(const char *path, int *n_tensors) { return walk(path, 1, NULL, NULL, n_tensors); }

int st_ckpt_list_tensors(const char *path, st_ckpt_tensor_fn fn, void *ctx) { return walk(path, 0, fn, ctx, NULL); }

int st_ckpt_read_tensor(const char *path, const char *dataset, float *out, size_t numel) {
    hid_t f = open_file(path);
    if (f < 0) return ST_EFORMAT;
    int rc = 0;
    hid_t d = H5Dopen2(f, dataset, H5P_DEFAULT);
    if (d < 0) rc = st_fail(ST_EFORMAT, "checkpoint %s: tensor %s is missing", path, dataset);
    if (!rc) {
        hid_t sp = H5Dget_space(d);
        hssize_t n = H5Sget_simple_extent_npoints(sp);
        H5Sclose(sp);
        if (n < 0 || (size_t)n != numel) rc = st_fail(ST_ESHAPE, "checkpoint %s: tensor %s has %lld elements, expected %zu", path, dataset, (long long)n, numel);
        else if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
            rc = st_fail(ST_ECORRUPT, "checkpoint %s: tensor %s is corrupt or truncated: %s", path, dataset, st_ckpt_h5_reason());
        H5Dclose(d);
    }
    H5Fclose(f);
    return rc;
}

int st_ckpt_load_param(const char *path, const st_model *m, int i, float *dst) {
    const st_param *p = &m->params[i];
    hid_t f = open_file(path);
    if (f < 0) return ST_EFORMAT;
    int rc = read_verified(f, p, dst, path);
    H5Fclose(f);
    return rc;
}
