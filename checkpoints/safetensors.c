/* safetensors.c — safetensors reader (validating header parser, pread-based tensor reads with fp16/bf16
 * upcast) and fp32 writer (single file or HF-style shards + index). See safetensors.h.
 *
 * Memory: the st_safetensors handle owns its paths, descriptors, tensor table and metadata strings.
 * Header JSON trees live only while a file is being opened. Tensor data is never cached. */
#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "kernels/bf16.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

struct st_safetensors {
    int n_files;
    char **paths;
    int *fds;
    uint64_t *data_start; /* 8 + header length, per file */
    int n, cap;
    st_st_tensor *tensors;
    int *by_name; /* tensor indices sorted by name, for st_safetensors_find */
    int n_meta;
    char **meta_keys, **meta_vals;
};

static const char *const dtype_names[ST_DTYPE_COUNT] = {"F32", "F16", "BF16", "F64", "I64",
                                                        "I32", "I16", "I8",   "U8",  "BOOL"};
static const size_t dtype_sizes[ST_DTYPE_COUNT] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};

size_t st_dtype_size(int dtype) { return (dtype >= 0 && dtype < ST_DTYPE_COUNT) ? dtype_sizes[dtype] : 0; }
const char *st_dtype_name(int dtype) { return (dtype >= 0 && dtype < ST_DTYPE_COUNT) ? dtype_names[dtype] : "?"; }

static int dtype_from_name(const char *s) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(s, dtype_names[i]) == 0) return i;
    return -1;
}

uint64_t st_st_numel(const st_st_tensor *t) {
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
    return n;
}

/* "[2,3,4]" into buf, for messages. */
static const char *shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && k < cap; d++)
        k += (size_t)snprintf(buf + k, cap - k, d ? ",%" PRId64 : "%" PRId64, shape[d]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
    return buf;
}

/* ---------------------------------------------------------------- fp16 / bf16 */

float st_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t man = h & 0x3FF;
    uint32_t u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13); /* inf, or nan keeping its payload */
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13); /* rebias 15 -> 127 */
    } else if (man == 0) {
        u = sign; /* signed zero */
    } else {
        /* subnormal: value = man * 2^-24; normalize the mantissa into fp32's implicit-one form */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------- low-level I/O */

/* 0 on success, 1 at an unexpected end of file, -errno on an I/O error. */
static int pread_full(int fd, void *buf, size_t len, uint64_t off) {
    char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) return 1;
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* ---------------------------------------------------------------- reader: one file */

static int add_tensor(st_safetensors *s, st_st_tensor **out) {
    if (s->n == s->cap) {
        int nc = s->cap ? s->cap * 2 : 64;
        st_st_tensor *nt = realloc(s->tensors, (size_t)nc * sizeof *nt);
        if (!nt) return st_fail(ST_ENOMEM, "out of memory reading safetensors header");
        s->tensors = nt;
        s->cap = nc;
    }
    *out = &s->tensors[s->n++];
    memset(*out, 0, sizeof **out);
    return 0;
}

static int read_metadata(st_safetensors *s, const char *path, const st_json *meta) {
    if (meta->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "%s: __metadata__ is not an object", path);
    if (s->n_meta > 0) return 0; /* keep the first file's */
    s->meta_keys = calloc(meta->count + 1, sizeof(char *));
    s->meta_vals = calloc(meta->count + 1, sizeof(char *));
    if (!s->meta_keys || !s->meta_vals) return st_fail(ST_ENOMEM, "out of memory reading %s", path);
    for (size_t i = 0; i < meta->count; i++) {
        if (meta->items[i]->type != ST_JSON_STRING) continue; /* spec: str -> str; ignore others */
        char *k = strdup(meta->keys[i]), *v = strdup(meta->items[i]->string);
        if (!k || !v) { free(k); free(v); return st_fail(ST_ENOMEM, "out of memory reading %s", path); }
        s->meta_keys[s->n_meta] = k;
        s->meta_vals[s->n_meta] = v;
        s->n_meta++;
    }
    return 0;
}

/* Validates one header entry and fills t (data bounds are checked by the caller). */
static int parse_entry(const char *path, const char *name, const st_json *e, st_st_tensor *t) {
    if (strlen(name) >= ST_ST_MAX_NAME)
        return st_fail(ST_EFORMAT, "%s: tensor name '%.40s...' longer than %d bytes", path, name, ST_ST_MAX_NAME - 1);
    if (name[0] == 0) return st_fail(ST_EFORMAT, "%s: tensor with an empty name", path);
    memcpy(t->name, name, strlen(name) + 1);
    if (e->type != ST_JSON_OBJECT) return st_fail(ST_EFORMAT, "%s: tensor '%s' entry is not an object", path, name);
    const st_json *dt = st_json_get(e, "dtype");
    if (!dt || dt->type != ST_JSON_STRING)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' has no \"dtype\" string", path, name);
    t->dtype = dtype_from_name(dt->string);
    if (t->dtype < 0)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' has unknown dtype '%.32s'", path, name, dt->string);
    const st_json *sh = st_json_get(e, "shape");
    if (!sh || sh->type != ST_JSON_ARRAY)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' has no \"shape\" array", path, name);
    if (sh->count > ST_ST_MAX_NDIM)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' has %zu dimensions (at most %d supported)", path, name,
                       sh->count, ST_ST_MAX_NDIM);
    t->ndim = (int)sh->count;
    uint64_t bytes = dtype_sizes[t->dtype];
    int overflow = 0;
    for (int d = 0; d < t->ndim; d++) {
        const st_json *x = sh->items[d];
        if (x->type != ST_JSON_NUMBER || !x->is_integer || x->integer < 0)
            return st_fail(ST_EFORMAT, "%s: tensor '%s' shape[%d] is not a non-negative integer", path, name, d);
        t->shape[d] = x->integer;
        overflow |= __builtin_mul_overflow(bytes, (uint64_t)x->integer, &bytes);
    }
    const st_json *of = st_json_get(e, "data_offsets");
    if (!of || of->type != ST_JSON_ARRAY || of->count != 2 || of->items[0]->type != ST_JSON_NUMBER ||
        of->items[1]->type != ST_JSON_NUMBER || !of->items[0]->is_integer || !of->items[1]->is_integer ||
        of->items[0]->integer < 0 || of->items[1]->integer < of->items[0]->integer)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' needs \"data_offsets\": [begin, end] with 0 <= begin <= end",
                       path, name);
    t->begin = (uint64_t)of->items[0]->integer;
    t->end = (uint64_t)of->items[1]->integer;
    char sb[160];
    if (overflow)
        return st_fail(ST_EFORMAT, "%s: tensor '%s' shape %s is too large", path, name,
                       shape_str(sb, sizeof sb, t->ndim, t->shape));
    if (bytes != t->end - t->begin)
        return st_fail(ST_EFORMAT,
                       "%s: tensor '%s' shape %s of %s needs %" PRIu64 " bytes but data_offsets [%" PRIu64 ",%" PRIu64
                       "] span %" PRIu64,
                       path, name, shape_str(sb, sizeof sb, t->ndim, t->shape), dtype_names[t->dtype], bytes,
                       t->begin, t->end, t->end - t->begin);
    return 0;
}

/* qsort has no context argument: the table being sorted, per thread so concurrent opens are safe */
static _Thread_local const st_st_tensor *g_sort_tensors;

static int cmp_by_begin(const void *a, const void *b) {
    const st_st_tensor *x = &g_sort_tensors[*(const int *)a], *y = &g_sort_tensors[*(const int *)b];
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int cmp_by_name(const void *a, const void *b) {
    return strcmp(g_sort_tensors[*(const int *)a].name, g_sort_tensors[*(const int *)b].name);
}

/* Tensors [first, s->n) all belong to one file: their non-empty byte ranges must not overlap. */
static int check_overlaps(st_safetensors *s, const char *path, int first) {
    int cnt = s->n - first;
    if (cnt < 2) return 0;
    int *idx = malloc((size_t)cnt * sizeof *idx);
    if (!idx) return st_fail(ST_ENOMEM, "out of memory reading %s", path);
    for (int i = 0; i < cnt; i++) idx[i] = first + i;
    g_sort_tensors = s->tensors;
    qsort(idx, (size_t)cnt, sizeof *idx, cmp_by_begin);
    int prev = -1, rc = 0;
    for (int i = 0; i < cnt && rc == 0; i++) {
        const st_st_tensor *t = &s->tensors[idx[i]];
        if (t->begin == t->end) continue; /* empty tensors occupy no bytes */
        if (prev >= 0 && t->begin < s->tensors[prev].end) {
            const st_st_tensor *p = &s->tensors[prev];
            rc = st_fail(ST_EFORMAT,
                         "%s: tensor '%s' data_offsets [%" PRIu64 ",%" PRIu64 "] overlap tensor '%s' [%" PRIu64
                         ",%" PRIu64 "]",
                         path, t->name, t->begin, t->end, p->name, p->begin, p->end);
        }
        if (prev < 0 || t->end > s->tensors[prev].end) prev = idx[i];
    }
    free(idx);
    return rc;
}

static int add_file(st_safetensors *s, const char *path, int fd) {
    char **np = realloc(s->paths, (size_t)(s->n_files + 1) * sizeof *np);
    if (np) s->paths = np;
    int *nf = realloc(s->fds, (size_t)(s->n_files + 1) * sizeof *nf);
    if (nf) s->fds = nf;
    uint64_t *nd = realloc(s->data_start, (size_t)(s->n_files + 1) * sizeof *nd);
    if (nd) s->data_start = nd;
    char *p = strdup(path);
    if (!np || !nf || !nd || !p) {
        free(p);
        close(fd);
        return st_fail(ST_ENOMEM, "out of memory opening %s", path);
    }
    s->paths[s->n_files] = p;
    s->fds[s->n_files] = fd;
    s->data_start[s->n_files] = 0;
    s->n_files++;
    return 0;
}

/* Opens one .safetensors file, validates its header and appends its tensors. */
static int open_file(st_safetensors *s, const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return st_fail(ST_EIO, "cannot open %s: %s", path, strerror(errno));
    int rc = add_file(s, path, fd);
    if (rc) return rc;
    int file = s->n_files - 1;
    struct stat stt;
    if (fstat(fd, &stt) != 0) return st_fail(ST_EIO, "cannot stat %s: %s", path, strerror(errno));
    if (!S_ISREG(stt.st_mode)) return st_fail(ST_EIO, "%s: not a regular file", path);
    uint64_t fsize = (uint64_t)stt.st_size;
    if (fsize < 8) return st_fail(ST_EFORMAT, "%s: %" PRIu64 " bytes, too short for a safetensors file", path, fsize);
    unsigned char lenb[8];
    if (pread_full(fd, lenb, 8, 0) != 0) return st_fail(ST_EIO, "%s: cannot read the header length", path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenb[i];
    if (hlen > ST_ST_MAX_HEADER)
        return st_fail(ST_EFORMAT, "%s: header length %" PRIu64 " exceeds the %u-byte limit (not a safetensors file?)",
                       path, hlen, ST_ST_MAX_HEADER);
    if (hlen > fsize - 8)
        return st_fail(ST_EFORMAT, "%s: header length %" PRIu64 " is larger than the file (%" PRIu64 " bytes; truncated?)",
                       path, hlen, fsize);
    if (hlen < 2) return st_fail(ST_EFORMAT, "%s: header length %" PRIu64 " is too small", path, hlen);
    s->data_start[file] = 8 + hlen;
    char *hdr = malloc((size_t)hlen + 1);
    if (!hdr) return st_fail(ST_ENOMEM, "%s: out of memory for a %" PRIu64 "-byte header", path, hlen);
    if (pread_full(fd, hdr, (size_t)hlen, 8) != 0) {
        free(hdr);
        return st_fail(ST_EIO, "%s: cannot read the header", path);
    }
    hdr[hlen] = 0;
    st_json *root = NULL;
    rc = st_json_parse(hdr, (size_t)hlen, &root);
    free(hdr);
    if (rc) return st_fail_context(rc, "%s: header", path);
    if (root->type != ST_JSON_OBJECT) {
        st_json_free(root);
        return st_fail(ST_EFORMAT, "%s: header is not a JSON object", path);
    }
    int first = s->n;
    uint64_t buf_size = fsize - 8 - hlen;
    for (size_t i = 0; i < root->count && rc == 0; i++) {
        if (strcmp(root->keys[i], "__metadata__") == 0) {
            rc = read_metadata(s, path, root->items[i]);
            continue;
        }
        st_st_tensor *t = NULL;
        if ((rc = add_tensor(s, &t)) != 0) break;
        t->file = file;
        rc = parse_entry(path, root->keys[i], root->items[i], t);
        if (rc == 0 && t->end > buf_size)
            rc = st_fail(ST_EFORMAT, "%s: tensor '%s' data_offsets [%" PRIu64 ",%" PRIu64
                         "] beyond end of file (truncated?)", path, t->name, t->begin, t->end);
    }
    st_json_free(root);
    if (rc) return rc;
    return check_overlaps(s, path, first);
}

/* Sorts tensor indices by name for st_safetensors_find and rejects duplicate names (within a file the
 * JSON parser keeps duplicate keys; across shards the same name may appear twice). */
static int build_name_index(st_safetensors *s, const char *path) {
    s->by_name = malloc(((size_t)s->n + 1) * sizeof *s->by_name);
    if (!s->by_name) return st_fail(ST_ENOMEM, "out of memory opening %s", path);
    g_sort_tensors = s->tensors;
    for (int i = 0; i < s->n; i++) s->by_name[i] = i;
    qsort(s->by_name, (size_t)s->n, sizeof *s->by_name, cmp_by_name);
    for (int i = 1; i < s->n; i++) {
        const st_st_tensor *a = &s->tensors[s->by_name[i - 1]], *b = &s->tensors[s->by_name[i]];
        if (strcmp(a->name, b->name) == 0)
            return st_fail(ST_EFORMAT, "%s: tensor '%s' appears twice (in %s and %s)", path, a->name,
                           s->paths[a->file], s->paths[b->file]);
    }
    return 0;
}

/* ---------------------------------------------------------------- reader: directory / index */

static int path_join(char *out, size_t cap, const char *dir, const char *name) {
    int k = snprintf(out, cap, "%s/%s", dir, name);
    if (k < 0 || (size_t)k >= cap) return st_fail(ST_EINVAL, "path too long: %s/%s", dir, name);
    return 0;
}

static int valid_shard_name(const char *n) {
    size_t len = strlen(n);
    return len > 0 && len < ST_ST_MAX_NAME && !strchr(n, '/') && strcmp(n, ".") != 0 && strcmp(n, "..") != 0;
}

/* Opens the shards an HF index lists (each once, in order of first mention) and checks that every
 * tensor in the weight_map is found in the shard it names. */
static int open_index(st_safetensors *s, const char *dir, const char *index_path) {
    struct stat stt;
    if (stat(index_path, &stt) != 0) return st_fail(ST_EIO, "cannot open %s: %s", index_path, strerror(errno));
    if ((uint64_t)stt.st_size > ST_ST_MAX_HEADER)
        return st_fail(ST_EFORMAT, "%s: %lld bytes, too large for an index", index_path, (long long)stt.st_size);
    char *text;
    size_t len;
    int rc = st_read_file(index_path, &text, &len);
    if (rc) return rc;
    st_json *root = NULL;
    rc = st_json_parse(text, len, &root);
    free(text);
    if (rc) return st_fail_context(rc, "%s", index_path);
    const st_json *wm = st_json_get(root, "weight_map");
    if (!wm || wm->type != ST_JSON_OBJECT) {
        st_json_free(root);
        return st_fail(ST_EFORMAT, "%s: missing \"weight_map\" object", index_path);
    }
    if (wm->count == 0) {
        st_json_free(root);
        return st_fail(ST_EFORMAT, "%s: \"weight_map\" is empty", index_path);
    }
    /* shard_of[i] = file index of weight_map entry i's shard */
    int *shard_of = malloc(wm->count * sizeof *shard_of);
    if (!shard_of) { st_json_free(root); return st_fail(ST_ENOMEM, "out of memory reading %s", index_path); }
    const char **names = malloc(wm->count * sizeof *names);
    int n_shards = 0;
    if (!names) rc = st_fail(ST_ENOMEM, "out of memory reading %s", index_path);
    for (size_t i = 0; i < wm->count && rc == 0; i++) {
        const st_json *v = wm->items[i];
        if (v->type != ST_JSON_STRING || !valid_shard_name(v->string)) {
            rc = st_fail(ST_EFORMAT, "%s: tensor '%.255s' maps to an invalid shard file name", index_path, wm->keys[i]);
            break;
        }
        int k = 0;
        while (k < n_shards && strcmp(names[k], v->string) != 0) k++;
        if (k == n_shards) {
            names[n_shards++] = v->string;
            char shard_path[4096];
            rc = path_join(shard_path, sizeof shard_path, dir, v->string);
            if (rc == 0) rc = open_file(s, shard_path);
        }
        shard_of[i] = k;
    }
    if (rc == 0) {
        /* the weight_map must agree with the shards; find() needs the name index built first */
        rc = build_name_index(s, index_path);
        for (size_t i = 0; i < wm->count && rc == 0; i++) {
            const st_st_tensor *t = st_safetensors_find(s, wm->keys[i]);
            if (!t || t->file != shard_of[i])
                rc = st_fail(ST_EFORMAT, "%s: tensor '%.255s' is mapped to %s but not found there", index_path,
                             wm->keys[i], names[shard_of[i]]);
        }
    }
    free(names);
    free(shard_of);
    st_json_free(root);
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static int open_any(st_safetensors *s, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return st_fail(ST_EIO, "cannot open %s: %s", path, strerror(errno));
    char buf[4096];
    if (S_ISDIR(st.st_mode)) {
        int rc = path_join(buf, sizeof buf, path, "model.safetensors");
        if (rc) return rc;
        if (file_exists(buf)) return open_file(s, buf);
        if ((rc = path_join(buf, sizeof buf, path, "model.safetensors.index.json")) != 0) return rc;
        if (file_exists(buf)) return open_index(s, path, buf);
        return st_fail(ST_EIO, "%s: no model.safetensors or model.safetensors.index.json in this directory", path);
    }
    if (ends_with(path, ".index.json")) {
        size_t n = strlen(path);
        if (n >= sizeof buf) return st_fail(ST_EINVAL, "path too long: %s", path);
        memcpy(buf, path, n + 1);
        char *slash = strrchr(buf, '/');
        if (slash) *slash = 0;
        else strcpy(buf, ".");
        return open_index(s, buf, path);
    }
    return open_file(s, path);
}

int st_safetensors_open(const char *path, st_safetensors **out) {
    *out = NULL;
    st_safetensors *s = calloc(1, sizeof *s);
    if (!s) return st_fail(ST_ENOMEM, "out of memory opening %s", path);
    int rc = open_any(s, path);
    if (rc == 0 && !s->by_name) rc = build_name_index(s, path);
    if (rc) {
        st_safetensors_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

void st_safetensors_close(st_safetensors *s) {
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        close(s->fds[i]);
        free(s->paths[i]);
    }
    for (int i = 0; i < s->n_meta; i++) {
        free(s->meta_keys[i]);
        free(s->meta_vals[i]);
    }
    free(s->meta_keys);
    free(s->meta_vals);
    free(s->paths);
    free(s->fds);
    free(s->data_start);
    free(s->tensors);
    free(s->by_name);
    free(s);
}

int st_safetensors_count(const st_safetensors *s) { return s->n; }

const st_st_tensor *st_safetensors_tensor(const st_safetensors *s, int i) {
    return (i >= 0 && i < s->n) ? &s->tensors[i] : NULL;
}

const st_st_tensor *st_safetensors_find(const st_safetensors *s, const char *name) {
    if (!s->by_name) return NULL;
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, s->tensors[s->by_name[mid]].name);
        if (c == 0) return &s->tensors[s->by_name[mid]];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

const char *st_safetensors_metadata(const st_safetensors *s, const char *key) {
    for (int i = 0; i < s->n_meta; i++)
        if (strcmp(s->meta_keys[i], key) == 0) return s->meta_vals[i];
    return NULL;
}

const char *st_safetensors_file_path(const st_safetensors *s, int file) {
    return (file >= 0 && file < s->n_files) ? s->paths[file] : "?";
}

/* ---------------------------------------------------------------- reading data */

static int check_owned(const st_safetensors *s, const st_st_tensor *t) {
    if (!t || t < s->tensors || t >= s->tensors + s->n)
        return st_fail(ST_EINVAL, "tensor handle does not belong to this safetensors file");
    return 0;
}

static int read_bytes(st_safetensors *s, const st_st_tensor *t, void *dst, size_t len, uint64_t off) {
    int rc = pread_full(s->fds[t->file], dst, len, s->data_start[t->file] + t->begin + off);
    if (rc == 0) return 0;
    if (rc == 1)
        return st_fail(ST_EIO, "%s: tensor '%s' ends past end of file (file truncated after opening?)",
                       s->paths[t->file], t->name);
    return st_fail(ST_EIO, "%s: reading tensor '%s': %s", s->paths[t->file], t->name, strerror(-rc));
}

int st_safetensors_read_raw(st_safetensors *s, const st_st_tensor *t, void *dst, size_t bytes) {
    int rc = check_owned(s, t);
    if (rc) return rc;
    if (bytes != t->end - t->begin)
        return st_fail(ST_ESHAPE, "%s: tensor '%s' holds %" PRIu64 " bytes, caller expects %zu", s->paths[t->file],
                       t->name, t->end - t->begin, bytes);
    return bytes ? read_bytes(s, t, dst, bytes, 0) : 0;
}

int st_safetensors_read_f32(st_safetensors *s, const st_st_tensor *t, float *dst, size_t n_elems) {
    int rc = check_owned(s, t);
    if (rc) return rc;
    uint64_t numel = st_st_numel(t);
    char sb[160];
    if (numel != (uint64_t)n_elems)
        return st_fail(ST_ESHAPE, "%s: tensor '%s' has shape %s (%" PRIu64 " elements) but %zu elements were expected",
                       s->paths[t->file], t->name, shape_str(sb, sizeof sb, t->ndim, t->shape), numel, n_elems);
    return st_safetensors_read_f32_range(s, t, 0, n_elems, dst);
}

/* n elements of dtype F16 / BF16 / F64 at buf (unaligned, host byte order as the file's) as floats; one loop per dtype, so
 * the BF16 one (a 16-bit shift) vectorizes. */
static void convert_to_f32(int dtype, const unsigned char *buf, size_t n, float *dst) {
    if (dtype == ST_DTYPE_BF16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, buf + 2 * i, 2);
            uint32_t u = (uint32_t)h << 16;
            memcpy(dst + i, &u, 4);
        }
    } else if (dtype == ST_DTYPE_F16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, buf + 2 * i, 2);
            dst[i] = st_f16_to_f32(h);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, buf + 8 * i, 8);
            dst[i] = (float)d;
        }
    }
}

int st_safetensors_read_f32_range(st_safetensors *s, const st_st_tensor *t, uint64_t first, size_t n, float *dst) {
    int rc = check_owned(s, t);
    if (rc) return rc;
    uint64_t numel = st_st_numel(t);
    if (first > numel || n > numel - first)
        return st_fail(ST_ESHAPE, "%s: tensor '%s' has %" PRIu64 " elements; elements [%" PRIu64 ", %" PRIu64
                       ") were asked for", s->paths[t->file], t->name, numel, first, first + n);
    if (t->dtype == ST_DTYPE_F32) return n ? read_bytes(s, t, dst, n * 4, first * 4) : 0;
    if (t->dtype != ST_DTYPE_F16 && t->dtype != ST_DTYPE_BF16 && t->dtype != ST_DTYPE_F64)
        return st_fail(ST_EINVAL, "%s: tensor '%s' has dtype %s, which cannot be read as fp32", s->paths[t->file],
                       t->name, dtype_names[t->dtype]);
    /* convert through a bounded staging buffer rather than a second full-size copy */
    enum { CHUNK = 1 << 16 };
    size_t esize = dtype_sizes[t->dtype];
    unsigned char *buf = malloc(CHUNK * esize);
    if (!buf) return st_fail(ST_ENOMEM, "out of memory reading tensor '%s'", t->name);
    for (size_t done = 0; done < n && rc == 0;) {
        size_t k = n - done < CHUNK ? n - done : CHUNK;
        rc = read_bytes(s, t, buf, k * esize, (first + done) * esize);
        if (rc) break;
        convert_to_f32(t->dtype, buf, k, dst + done);
        done += k;
    }
    free(buf);
    return rc;
}

int st_safetensors_read_bf16_range(st_safetensors *s, const st_st_tensor *t, uint64_t first, size_t n, uint16_t *dst) {
    int rc = check_owned(s, t);
    if (rc) return rc;
    uint64_t numel = st_st_numel(t);
    if (t->dtype != ST_DTYPE_BF16)
        return st_fail(ST_EINVAL, "%s: tensor '%s' has dtype %s, not BF16", s->paths[t->file], t->name,
                       dtype_names[t->dtype]);
    if (first > numel || n > numel - first)
        return st_fail(ST_ESHAPE, "%s: tensor '%s' has %" PRIu64 " elements; elements [%" PRIu64 ", %" PRIu64
                       ") were asked for", s->paths[t->file], t->name, numel, first, first + n);
    return n ? read_bytes(s, t, dst, n * 2, first * 2) : 0; /* the file's bits as they are (little-endian host) */
}

/* ---------------------------------------------------------------- writer */

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int check_items(const char *path, int n, const st_st_write_item *items, int dtype, int need_data,
                       uint64_t *total_bytes) {
    if (n < 0) return st_fail(ST_EINVAL, "%s: negative tensor count", path);
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        const st_st_write_item *it = &items[i];
        if (!it->name || !it->name[0] || strlen(it->name) >= ST_ST_MAX_NAME)
            return st_fail(ST_EINVAL, "%s: tensor %d has an empty or too long name", path, i);
        if (it->ndim < 0 || it->ndim > ST_ST_MAX_NDIM)
            return st_fail(ST_EINVAL, "%s: tensor '%s' has ndim %d (0..%d allowed)", path, it->name, it->ndim,
                           ST_ST_MAX_NDIM);
        uint64_t bytes = st_dtype_size(dtype);
        for (int d = 0; d < it->ndim; d++) {
            if (it->shape[d] < 0) return st_fail(ST_EINVAL, "%s: tensor '%s' has a negative dimension", path, it->name);
            if (__builtin_mul_overflow(bytes, (uint64_t)it->shape[d], &bytes) || bytes > INT64_MAX)
                return st_fail(ST_EINVAL, "%s: tensor '%s' is too large", path, it->name);
        }
        if (need_data && bytes > 0 && !it->data) return st_fail(ST_EINVAL, "%s: tensor '%s' has no data", path, it->name);
        if (__builtin_add_overflow(total, bytes, &total) || total > INT64_MAX)
            return st_fail(ST_EINVAL, "%s: tensors too large in total", path);
    }
    const char **names = malloc(((size_t)n + 1) * sizeof *names);
    if (!names) return st_fail(ST_ENOMEM, "out of memory writing %s", path);
    for (int i = 0; i < n; i++) names[i] = items[i].name;
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    int rc = 0;
    for (int i = 1; i < n && rc == 0; i++)
        if (strcmp(names[i - 1], names[i]) == 0) rc = st_fail(ST_EINVAL, "%s: tensor '%s' given twice", path, names[i]);
    free(names);
    if (total_bytes) *total_bytes = total;
    return rc;
}

static uint64_t item_bytes(const st_st_write_item *it, int dtype) {
    uint64_t b = st_dtype_size(dtype);
    for (int d = 0; d < it->ndim; d++) b *= (uint64_t)it->shape[d];
    return b;
}

/* The header JSON, space-padded so the data buffer starts 8-byte aligned. */
static int build_header(const char *path, int n, const st_st_write_item *items, int dtype, const char *metadata,
                        st_strbuf *h) {
    st_strbuf_printf(h, "{\"__metadata__\":");
    if (metadata) {
        st_json *m = NULL;
        int rc = st_json_parse(metadata, strlen(metadata), &m);
        if (rc) return st_fail_context(ST_EINVAL, "%s: metadata", path);
        int ok = m->type == ST_JSON_OBJECT;
        for (size_t i = 0; ok && i < m->count; i++) ok = m->items[i]->type == ST_JSON_STRING;
        if (ok) {
            st_strbuf_append(h, "{", 1);
            for (size_t i = 0; i < m->count; i++) {
                if (i) st_strbuf_append(h, ",", 1);
                st_strbuf_json_string(h, m->keys[i]);
                st_strbuf_append(h, ":", 1);
                st_strbuf_json_string(h, m->items[i]->string);
            }
            st_strbuf_append(h, "}", 1);
        }
        st_json_free(m);
        if (!ok) return st_fail(ST_EINVAL, "%s: metadata must be a JSON object of string values", path);
    } else {
        st_strbuf_printf(h, "{\"format\":\"pt\"}");
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const st_st_write_item *it = &items[i];
        uint64_t b = item_bytes(it, dtype);
        st_strbuf_append(h, ",", 1);
        st_strbuf_json_string(h, it->name);
        st_strbuf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(dtype));
        for (int d = 0; d < it->ndim; d++) st_strbuf_printf(h, d ? ",%" PRId64 : "%" PRId64, it->shape[d]);
        st_strbuf_printf(h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + b);
        off += b;
    }
    st_strbuf_append(h, "}", 1);
    while (!h->failed && h->len % 8 != 0) st_strbuf_append(h, " ", 1);
    if (h->failed) return st_fail(ST_ENOMEM, "out of memory writing %s", path);
    if (h->len > ST_ST_MAX_HEADER) return st_fail(ST_EINVAL, "%s: header would exceed %u bytes", path, ST_ST_MAX_HEADER);
    return 0;
}

static void fsync_parent_dir(const char *path) {
    char dir[4096];
    size_t n = strlen(path);
    if (n >= sizeof dir) return;
    memcpy(dir, path, n + 1);
    char *slash = strrchr(dir, '/');
    if (slash == dir) slash[1] = 0;
    else if (slash) *slash = 0;
    else strcpy(dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd); /* best effort: makes the rename durable */
        close(fd);
    }
}

/* f32 -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept quiet). */
static uint16_t f32_to_f16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (a < 0x38800000u) { /* half subnormal (or zero): value = a_float / 2^-24, rounded */
        float v;
        memcpy(&v, &a, sizeof v);
        float q = v * 16777216.0f; /* exact: scaling by 2^24 */
        uint32_t r = (uint32_t)q;
        float frac = q - (float)r;
        if (frac > 0.5f || (frac == 0.5f && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t e = ((a >> 23) - 112u) << 10, m = a & 0x7fffffu;
    uint32_t h = e | (m >> 13), rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* Writes n floats as `dtype` (F32 as is; BF16/F16 rounded to nearest even) in bounded chunks. */
static int write_floats(int fd, const float *x, size_t n, int dtype) {
    if (dtype == ST_DTYPE_F32) return write_all(fd, x, n * sizeof(float));
    uint16_t buf[4096];
    for (size_t i = 0; i < n;) {
        size_t k = n - i < 4096 ? n - i : 4096;
        for (size_t j = 0; j < k; j++)
            buf[j] = dtype == ST_DTYPE_BF16 ? st_float_to_bf16_bits(x[i + j]) : f32_to_f16_bits(x[i + j]);
        if (write_all(fd, buf, k * sizeof(uint16_t))) return -1;
        i += k;
    }
    return 0;
}

int st_safetensors_write(const char *path, int n, const st_st_write_item *items, const char *metadata_json) {
    return st_safetensors_write_as(path, n, items, metadata_json, ST_DTYPE_F32);
}

int st_safetensors_write_as(const char *path, int n, const st_st_write_item *items, const char *metadata_json,
                            int dtype) {
    if (dtype != ST_DTYPE_F32 && dtype != ST_DTYPE_BF16 && dtype != ST_DTYPE_F16)
        return st_fail(ST_EINVAL, "%s: tensors can be written as F32, BF16 or F16, not %s", path, st_dtype_name(dtype));
    int rc = check_items(path, n, items, dtype, 1, NULL);
    if (rc) return rc;
    st_strbuf h = {0};
    if ((rc = build_header(path, n, items, dtype, metadata_json, &h)) != 0) {
        st_strbuf_free(&h);
        return rc;
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.partial", path) >= (int)sizeof tmp) {
        st_strbuf_free(&h);
        return st_fail(ST_EINVAL, "path too long: %s", path);
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        st_strbuf_free(&h);
        return st_fail(ST_EIO, "cannot create %s: %s", tmp, strerror(errno));
    }
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    int bad = write_all(fd, lenb, 8) || write_all(fd, h.data, h.len);
    for (int i = 0; i < n && !bad; i++)
        bad = write_floats(fd, items[i].data, (size_t)(item_bytes(&items[i], dtype) / st_dtype_size(dtype)), dtype);
    int e = errno;
    st_strbuf_free(&h);
    if (bad || fsync(fd) != 0) {
        if (!bad) e = errno;
        close(fd);
        unlink(tmp);
        return st_fail(ST_EIO, "cannot write %s: %s", tmp, strerror(e));
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        e = errno;
        unlink(tmp);
        return st_fail(ST_EIO, "cannot finish %s: %s", path, strerror(e));
    }
    fsync_parent_dir(path);
    return 0;
}

int st_safetensors_write_sharded(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes) {
    return st_safetensors_write_sharded_as(dir, n, items, max_shard_bytes, ST_DTYPE_F32);
}

/* ---- the streaming writer: the layout (shards, headers, offsets) comes from the shapes alone, then the
 * tensors arrive one at a time, in order, and are written at once (nothing is buffered). ---- */

struct st_st_stream {
    char dir[4096];
    int n, dtype, n_shards, sharded, shard; /* sharded: names model-0000k-of-0000n + index; shard: the open one (-1 before the first, n_shards after the last) */
    st_st_write_item *items;         /* copies of the items (names owned), data unused */
    int *start;                      /* [n_shards + 1]: shard k covers items [start[k], start[k + 1]) */
    int next;                        /* the next item to put */
    int fd;                          /* the open shard's .partial, -1 when none */
    char path[4096], tmp[4200];      /* the open shard's final and .partial paths */
    uint64_t total;
};

static void stream_free(st_st_stream *w) {
    for (int i = 0; w->items && i < w->n; i++) free((char *)w->items[i].name);
    free(w->items);
    free(w->start);
    free(w);
}

static int shard_name(const st_st_stream *w, int k, char *out, size_t cap) {
    char name[64];
    if (!w->sharded) snprintf(name, sizeof name, "model.safetensors");
    else snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", k + 1, w->n_shards);
    return path_join(out, cap, w->dir, name);
}

/* Creates shard k's .partial and writes its header. */
static int stream_open_shard(st_st_stream *w, int k) {
    int rc = shard_name(w, k, w->path, sizeof w->path);
    if (rc) return rc;
    snprintf(w->tmp, sizeof w->tmp, "%s.partial", w->path);
    st_strbuf h = {0};
    if ((rc = build_header(w->path, w->start[k + 1] - w->start[k], w->items + w->start[k], w->dtype, NULL, &h))) {
        st_strbuf_free(&h);
        return rc;
    }
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        st_strbuf_free(&h);
        return st_fail(ST_EIO, "cannot create %s: %s", w->tmp, strerror(errno));
    }
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    int bad = write_all(w->fd, lenb, 8) || write_all(w->fd, h.data, h.len);
    int e = errno;
    st_strbuf_free(&h);
    w->shard = k;
    return bad ? st_fail(ST_EIO, "cannot write %s: %s", w->tmp, strerror(e)) : 0;
}

/* fsync, close and rename the open shard. */
static int stream_close_shard(st_st_stream *w) {
    int fd = w->fd;
    w->fd = -1;
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(w->tmp);
        return st_fail(ST_EIO, "cannot write %s: %s", w->tmp, strerror(e));
    }
    if (close(fd) != 0 || rename(w->tmp, w->path) != 0) {
        int e = errno;
        unlink(w->tmp);
        return st_fail(ST_EIO, "cannot finish %s: %s", w->path, strerror(e));
    }
    fsync_parent_dir(w->path);
    return 0;
}

int st_safetensors_stream_open(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes,
                               int dtype, st_st_stream **out) {
    *out = NULL;
    if (dtype != ST_DTYPE_F32 && dtype != ST_DTYPE_BF16 && dtype != ST_DTYPE_F16)
        return st_fail(ST_EINVAL, "%s: tensors can be written as F32, BF16 or F16, not %s", dir, st_dtype_name(dtype));
    uint64_t total = 0;
    int rc = check_items(dir, n, items, dtype, 0, &total);
    if (rc) return rc;
    if (strlen(dir) >= sizeof((st_st_stream *)0)->dir) return st_fail(ST_EINVAL, "path too long: %s", dir);
    if ((rc = st_mkdirs(dir)) != 0) return rc;
    st_st_stream *w = calloc(1, sizeof *w);
    if (!w) return st_fail(ST_ENOMEM, "out of memory writing %s", dir);
    snprintf(w->dir, sizeof w->dir, "%s", dir);
    w->dtype = dtype;
    w->total = total;
    w->fd = -1;
    w->shard = -1;
    w->items = calloc((size_t)n + 1, sizeof *w->items);
    w->start = malloc(((size_t)n + 2) * sizeof *w->start);
    if (!w->items || !w->start) { stream_free(w); return st_fail(ST_ENOMEM, "out of memory writing %s", dir); }
    for (int i = 0; i < n; i++, w->n++) {
        w->items[i] = items[i];
        w->items[i].data = NULL;
        if (!(w->items[i].name = strdup(items[i].name))) {
            stream_free(w);
            return st_fail(ST_ENOMEM, "out of memory writing %s", dir);
        }
    }
    /* one file when it fits; else greedy, in order (a new shard when the next tensor would overflow) */
    uint64_t cur = 0;
    w->sharded = max_shard_bytes && total > max_shard_bytes;
    for (int i = 0; i < n; i++) {
        uint64_t b = item_bytes(&items[i], dtype);
        if (w->n_shards == 0 || (w->sharded && cur > 0 && cur + b > max_shard_bytes)) {
            w->start[w->n_shards++] = i;
            cur = 0;
        }
        cur += b;
    }
    if (w->n_shards == 0) w->start[w->n_shards++] = 0;
    w->start[w->n_shards] = n;
    if (w->n_shards > 99999) {
        stream_free(w);
        return st_fail(ST_EINVAL, "%s: shards exceed the 5-digit shard naming", dir);
    }
    if ((rc = stream_open_shard(w, 0))) { st_safetensors_stream_abort(w); return rc; }
    if (n == 0 && (rc = stream_close_shard(w))) { st_safetensors_stream_abort(w); return rc; }
    if (n == 0) w->shard = w->n_shards;
    *out = w;
    return 0;
}

int st_safetensors_stream_put(st_st_stream *w, const float *data) {
    if (w->next >= w->n) return st_fail(ST_EINVAL, "%s: more tensors put than announced", w->dir);
    const st_st_write_item *it = &w->items[w->next];
    uint64_t b = item_bytes(it, w->dtype);
    if (b && !data) return st_fail(ST_EINVAL, "%s: tensor '%s' has no data", w->dir, it->name);
    if (w->next == w->start[w->shard + 1]) { /* the open shard is complete */
        int rc = stream_close_shard(w);
        if (!rc) rc = stream_open_shard(w, w->shard + 1);
        if (rc) return rc;
    }
    if (write_floats(w->fd, data, (size_t)(b / st_dtype_size(w->dtype)), w->dtype))
        return st_fail(ST_EIO, "cannot write %s: %s", w->tmp, strerror(errno));
    w->next++;
    return 0;
}

int st_safetensors_stream_finish(st_st_stream *w) {
    int rc = w->next == w->n ? 0 : st_fail(ST_EINVAL, "%s: %d of %d tensors were put", w->dir, w->next, w->n);
    if (!rc && w->fd >= 0) rc = stream_close_shard(w);
    char single[4096], index[4096];
    if (!rc) rc = path_join(single, sizeof single, w->dir, "model.safetensors");
    if (!rc) rc = path_join(index, sizeof index, w->dir, "model.safetensors.index.json");
    if (!rc && !w->sharded) {
        unlink(index); /* drop a stale index from an earlier sharded export */
    } else if (!rc) {
        st_strbuf idx = {0};
        st_strbuf_printf(&idx, "{\n  \"metadata\": {\"total_size\": %" PRIu64 "},\n  \"weight_map\": {", w->total);
        for (int k = 0; k < w->n_shards; k++) {
            char name[64];
            snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", k + 1, w->n_shards);
            for (int i = w->start[k]; i < w->start[k + 1]; i++) {
                st_strbuf_printf(&idx, "%s\n    ", i ? "," : "");
                st_strbuf_json_string(&idx, w->items[i].name);
                st_strbuf_printf(&idx, ": \"%s\"", name);
            }
        }
        st_strbuf_printf(&idx, "\n  }\n}\n");
        rc = idx.failed ? st_fail(ST_ENOMEM, "out of memory writing %s", index)
                        : st_write_file_atomic(index, idx.data, idx.len);
        st_strbuf_free(&idx);
        if (!rc) unlink(single); /* a single file would take precedence over the new index */
    }
    if (rc) st_safetensors_stream_abort(w);
    else stream_free(w);
    return rc;
}

void st_safetensors_stream_abort(st_st_stream *w) {
    if (!w) return;
    if (w->fd >= 0) {
        close(w->fd);
        unlink(w->tmp);
    }
    stream_free(w);
}

int st_safetensors_write_sharded_as(const char *dir, int n, const st_st_write_item *items, uint64_t max_shard_bytes,
                                    int dtype) {
    int rc = check_items(dir, n, items, dtype, 1, NULL);
    st_st_stream *w = NULL;
    if (!rc) rc = st_safetensors_stream_open(dir, n, items, max_shard_bytes, dtype, &w);
    for (int i = 0; i < n && !rc; i++) rc = st_safetensors_stream_put(w, items[i].data);
    if (rc) {
        st_safetensors_stream_abort(w);
        return rc;
    }
    return st_safetensors_stream_finish(w);
}
