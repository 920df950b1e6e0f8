/* prune.c — see prune.h. */
#include "worker/prune.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

void st_prune_stats_free(st_prune_stats *s) {
    free(s->layer_bi);
    free(s->group_score);
    free(s->chan_score);
    memset(s, 0, sizeof *s);
}

void st_prune_plan_free(st_prune_plan *p) {
    free(p->layers);
    free(p->group);
    free(p->chan);
    memset(p, 0, sizeof *p);
}

/* Host copy of parameter `name` (layer l) of m; NULL when absent. */
static const float *param_ptr(const st_model *m, const float *host, const char *fmt, int l) {
    char name[96];
    snprintf(name, sizeof name, fmt, l);
    int i = st_model_find(m, name);
    return i < 0 ? NULL : host + m->params[i].offset;
}

static const char *o_proj_fmt(const st_model *m) {
    return m->cfg.family == ST_FAMILY_GPT2 ? "h.%d.attn.c_proj.weight" : "model.layers.%d.self_attn.o_proj.weight";
}
static const char *down_fmt(const st_model *m) {
    return m->cfg.family == ST_FAMILY_GPT2 ? "h.%d.mlp.c_proj.weight" : "model.layers.%d.mlp.down_proj.weight";
}

/* Host copies of one layer's activations (the backend may be a device), and scratch for the group scores. */
typedef struct { float *in, *att, *h, *out, *ga, *gw, *gc; } host_acts;

/* Adds, for every KV group g, the sum over tokens of ||W_o[:, cols(g)] a_t[cols(g)]||: one host matmul per
 * group ([rows, gw] x [gw, C]) instead of a scalar triple loop (minutes per layer on 7B-sized models). */
static void group_sums(const st_model *m, int l, const float *w, const host_acts *ha, int rows, st_prune_stats *s) {
    const st_model_config *c = &m->cfg;
    int C = c->d_model, A = c->n_head * c->head_dim, G = c->n_kv_head, gw = (c->n_head / G) * c->head_dim;
    const float *wo = param_ptr(m, w, o_proj_fmt(m), l);
    const st_backend *cpu = st_backend_cpu(0);
    for (int g = 0; g < G; g++) {
        for (int t = 0; t < rows; t++)
            memcpy(ha->ga + (size_t)t * gw, ha->att + (size_t)t * A + (size_t)g * gw, (size_t)gw * sizeof(float));
        for (int o = 0; o < C; o++)
            memcpy(ha->gw + (size_t)o * gw, wo + (size_t)o * A + (size_t)g * gw, (size_t)gw * sizeof(float));
        cpu->matmul(ha->gc, ha->ga, ha->gw, rows, C, gw, 0, 1, 1.0f, 0.0f);
        double sum = 0;
        for (int t = 0; t < rows; t++) {
            double n2 = 0;
            for (int k = 0; k < C; k++) n2 += (double)ha->gc[(size_t)t * C + k] * ha->gc[(size_t)t * C + k];
            sum += sqrt(n2);
        }
        s->group_score[(size_t)l * G + g] += sum;
    }
}

/* Accumulates one layer's importance sums over the first `rows` tokens of the batch. */
static void layer_sums(const st_model *m, int l, const float *w, const host_acts *ha, int rows, st_prune_stats *s) {
    const st_model_config *c = &m->cfg;
    int C = c->d_model, F = c->d_ff;
    for (int t = 0; t < rows; t++) {
        const float *x = ha->in + (size_t)t * C, *y = ha->out + (size_t)t * C;
        double dot = 0, nx = 0, ny = 0;
        for (int k = 0; k < C; k++) {
            dot += (double)x[k] * y[k];
            nx += (double)x[k] * x[k];
            ny += (double)y[k] * y[k];
        }
        s->layer_bi[l] += nx > 0 && ny > 0 ? 1.0 - dot / sqrt(nx * ny) : 0.0;
        const float *hr = ha->h + (size_t)t * F;
        for (int j = 0; j < F; j++) s->chan_score[(size_t)l * F + j] += (double)hr[j] * hr[j];
    }
    group_sums(m, l, w, ha, rows, s);
}

/* Turns the sums into the importance scores (means; channels times their down-projection column norm). */
static void finish_scores(const st_model *m, const float *w, double tokens, st_prune_stats *s) {
    int C = m->cfg.d_model, F = s->F;
    for (int l = 0; l < s->L; l++) {
        s->layer_bi[l] /= tokens;
        for (int g = 0; g < s->G; g++) s->group_score[(size_t)l * s->G + g] /= tokens;
        const float *wd = param_ptr(m, w, down_fmt(m), l);
        for (int j = 0; j < F; j++) {
            double col = 0;
            for (int o = 0; o < C; o++) col += (double)wd[(size_t)o * F + j] * wd[(size_t)o * F + j];
            double *v = &s->chan_score[(size_t)l * F + j];
            *v = sqrt(*v / tokens) * sqrt(col);
        }
    }
}

static int fetch_layer(const st_model *m, int l, int rows, host_acts *ha) {
    const float *in, *att, *h, *out;
    int rc = st_model_layer_activations(m, l, &in, &att, &h, &out);
    if (rc) return rc;
    const st_model_config *c = &m->cfg;
    size_t N = (size_t)rows;
    m->be->copy_to_host(ha->in, in, N * c->d_model * sizeof(float));
    m->be->copy_to_host(ha->out, out, N * c->d_model * sizeof(float));
    m->be->copy_to_host(ha->att, att, N * c->n_head * c->head_dim * sizeof(float));
    m->be->copy_to_host(ha->h, h, N * c->d_ff * sizeof(float));
    return 0;
}

int st_prune_calibrate(st_model *m, const int32_t *inputs, const int32_t *targets, const float *weight, int n,
                       int importance, st_prune_stats *s) {
    const st_model_config *c = &m->cfg;
    int B = m->B, T = m->T, rc = 0;
    size_t N = (size_t)B * T;
    memset(s, 0, sizeof *s);
    s->L = c->n_layer, s->G = c->n_kv_head, s->F = c->d_ff;
    float *w = importance ? malloc(m->n_weights * sizeof(float)) : NULL;
    int32_t *in = calloc(N, sizeof *in), *tg = calloc(N, sizeof *tg);
    float *wt = calloc(N, sizeof *wt);
    host_acts ha = {0};
    if (importance) {
        s->layer_bi = calloc((size_t)s->L, sizeof(double));
        s->group_score = calloc((size_t)s->L * s->G, sizeof(double));
        s->chan_score = calloc((size_t)s->L * s->F, sizeof(double));
        ha.in = malloc(N * c->d_model * sizeof(float));
        ha.out = malloc(N * c->d_model * sizeof(float));
        ha.att = malloc(N * c->n_head * c->head_dim * sizeof(float));
        ha.h = malloc(N * c->d_ff * sizeof(float));
        size_t gw = (size_t)(c->n_head / c->n_kv_head) * c->head_dim;
        ha.ga = malloc(N * gw * sizeof(float));
        ha.gw = malloc((size_t)c->d_model * gw * sizeof(float));
        ha.gc = malloc(N * c->d_model * sizeof(float));
    }
    if (!in || !tg || !wt || (importance && (!w || !s->layer_bi || !s->group_score || !s->chan_score || !ha.in ||
                                             !ha.out || !ha.att || !ha.h || !ha.ga || !ha.gw || !ha.gc)))
        rc = st_fail(ST_ENOMEM, "out of memory for calibration");
    if (!rc && importance) m->be->copy_to_host(w, m->weights, m->n_weights * sizeof(float));
    double loss = 0, count = 0;
    for (int w0 = 0; w0 < n && !rc; w0 += B) {
        int rows = n - w0 < B ? n - w0 : B;
        size_t used = (size_t)rows * T;
        memcpy(in, inputs + (size_t)w0 * T, used * sizeof *in);
        memcpy(tg, targets + (size_t)w0 * T, used * sizeof *tg);
        memcpy(wt, weight + (size_t)w0 * T, used * sizeof *wt);
        memset(in + used, 0, (N - used) * sizeof *in);
        memset(tg + used, 0, (N - used) * sizeof *tg);
        memset(wt + used, 0, (N - used) * sizeof *wt);
        st_model_forward(m, in, tg, wt, 0);
        for (size_t i = 0; i < used; i++) {
            loss += (double)wt[i] * m->loss_per_pos[i];
            count += wt[i];
        }
        for (int l = 0; importance && l < c->n_layer && !rc; l++) {
            if (!(rc = fetch_layer(m, l, rows * T, &ha)))
                layer_sums(m, l, w, &ha, rows * T, s);
        }
    }
    if (!rc && importance) finish_scores(m, w, (double)n * T, s);
    s->loss = count > 0 ? loss / count : 0;
    s->targets = count;
    free(ha.in); free(ha.out); free(ha.att); free(ha.h); free(ha.ga); free(ha.gw); free(ha.gc);
    free(w); free(in); free(tg); free(wt);
    if (rc) st_prune_stats_free(s);
    return rc;
}

/* ---------------- plan ---------------- */

static const double *g_sort_key;
static int by_score_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (g_sort_key[i] != g_sort_key[j]) return g_sort_key[i] > g_sort_key[j] ? -1 : 1;
    return i - j;
}
static int by_index(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* The `keep` highest of score[0..n) (ties: lower index), written ascending by index into out. */
static int top_k(const double *score, int n, int keep, int *out) {
    int *idx = malloc((size_t)n * sizeof(int));
    if (!idx) return st_fail(ST_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++) idx[i] = i;
    g_sort_key = score;
    qsort(idx, (size_t)n, sizeof(int), by_score_desc);
    memcpy(out, idx, (size_t)keep * sizeof(int));
    qsort(out, (size_t)keep, sizeof(int), by_index);
    free(idx);
    return 0;
}

static int kept_count(const char *what, int total, double frac, int *keep) {
    if (!(frac >= 0 && frac < 1)) return st_fail(ST_EINVAL, "%s = %g must be in [0, 1)", what, frac);
    *keep = total - (int)floor(frac * total + 1e-9);
    if (*keep < 1) return st_fail(ST_EINVAL, "%s = %g would remove all %d", what, frac, total);
    return 0;
}

static int plan_layers(const st_model_config *c, const st_prune_spec *spec, const st_prune_stats *s, st_prune_plan *p) {
    int L = c->n_layer;
    unsigned char *drop = calloc((size_t)L, 1);
    if (!drop) return st_fail(ST_ENOMEM, "out of memory");
    if (spec->drop_layer) memcpy(drop, spec->drop_layer, (size_t)L);
    if (spec->drop_auto > 0) {
        if (spec->drop_auto >= L) {
            free(drop);
            return st_fail(ST_EINVAL, "--drop-layers: cannot drop %d of %d layers", spec->drop_auto, L);
        }
        double *neg = malloc((size_t)L * sizeof(double));
        int *lowest = malloc((size_t)L * sizeof(int));
        if (!neg || !lowest) { free(neg); free(lowest); free(drop); return st_fail(ST_ENOMEM, "out of memory"); }
        for (int l = 0; l < L; l++) neg[l] = -s->layer_bi[l];
        top_k(neg, L, spec->drop_auto, lowest);
        for (int k = 0; k < spec->drop_auto; k++) drop[lowest[k]] = 1;
        free(neg);
        free(lowest);
    }
    p->layers = malloc((size_t)L * sizeof(int));
    if (!p->layers) { free(drop); return st_fail(ST_ENOMEM, "out of memory"); }
    for (int l = 0; l < L; l++)
        if (!drop[l]) p->layers[p->n_layer++] = l;
    free(drop);
    return p->n_layer ? 0 : st_fail(ST_EINVAL, "--drop-layers would drop every layer");
}

int st_prune_plan_make(const st_model_config *c, const st_prune_spec *spec, const st_prune_stats *s,
                       st_prune_plan *p) {
    memset(p, 0, sizeof *p);
    int G = c->n_kv_head, F = c->d_ff, rc;
    if ((rc = kept_count("--prune-heads", G, spec->prune_heads, &p->groups)) ||
        (rc = kept_count("--prune-ffn", F, spec->prune_ffn, &p->chans)))
        return rc;
    if (c->family == ST_FAMILY_GPT2 && p->groups != G)
        return st_fail(ST_EINVAL, "--prune-heads: a GPT-2 config.json ties the head count to n_embd "
                                  "(head_dim = n_embd / n_head), so heads cannot be removed; prune FFN or layers");
    int need = spec->drop_auto > 0 || p->groups < G || p->chans < F;
    if (need && !s) return st_fail(ST_EINVAL, "choosing what to prune needs calibration data (--calib DATA.h5)");
    if ((rc = plan_layers(c, spec, s, p))) { st_prune_plan_free(p); return rc; }
    int NL = p->n_layer;
    p->group = malloc((size_t)NL * p->groups * sizeof(int));
    p->chan = malloc((size_t)NL * p->chans * sizeof(int));
    if (!p->group || !p->chan) { st_prune_plan_free(p); return st_fail(ST_ENOMEM, "out of memory"); }
    for (int l = 0; l < NL && !rc; l++) {
        int src = p->layers[l];
        if (p->groups == G) for (int g = 0; g < G; g++) p->group[l * G + g] = g;
        else rc = top_k(s->group_score + (size_t)src * G, G, p->groups, p->group + (size_t)l * p->groups);
        if (p->chans == F) for (int j = 0; j < F; j++) p->chan[(size_t)l * F + j] = j;
        else if (!rc) rc = top_k(s->chan_score + (size_t)src * F, F, p->chans, p->chan + (size_t)l * p->chans);
    }
    if (rc) st_prune_plan_free(p);
    return rc;
}

/* ---------------- apply ---------------- */

/* Which rows / columns of a (dst layer l) tensor survive; NULL = all. Rows of q (heads of kept groups),
 * k, v (kept groups), gate/up/c_fc (kept channels); columns of o_proj (heads) and down/c_proj (channels). */
static int index_maps(const st_model_config *c, const st_prune_plan *p, int l, const char *suffix, int *rows,
                      int *cols, int **rmap, int **cmap) {
    int hd = c->head_dim, rep = c->n_head / c->n_kv_head;
    const int *grp = p->group + (size_t)l * p->groups, *ch = p->chan + (size_t)l * p->chans;
    int *map = NULL, n = 0;
    int is_q = strstr(suffix, "q_proj.") != NULL, is_kv = strstr(suffix, "k_proj.") || strstr(suffix, "v_proj.");
    int is_o = strstr(suffix, "o_proj.") != NULL;
    int is_up = strstr(suffix, "gate_proj.") || strstr(suffix, "up_proj.") || strstr(suffix, "mlp.c_fc.");
    int is_down = strstr(suffix, "down_proj.") || strstr(suffix, "mlp.c_proj.");
    *rmap = *cmap = NULL;
    if (is_q || is_o || is_kv) {
        int per = is_kv ? hd : rep * hd;
        if (!(map = malloc((size_t)p->groups * per * sizeof(int)))) return st_fail(ST_ENOMEM, "out of memory");
        for (int k = 0; k < p->groups; k++)
            for (int i = 0; i < per; i++) map[n++] = grp[k] * per + i;
    } else if (is_up || is_down) {
        if (!(map = malloc((size_t)p->chans * sizeof(int)))) return st_fail(ST_ENOMEM, "out of memory");
        for (int k = 0; k < p->chans; k++) map[n++] = ch[k];
    }
    if (map && (is_o || is_down) && strstr(suffix, ".weight")) { *cmap = map; *cols = n; }
    else if (map && (is_o || is_down)) free(map); /* their biases are [C]: untouched */
    else if (map) { *rmap = map; *rows = n; }
    return 0;
}

static void copy_select(float *dst, const float *src, int64_t src_cols, int rows, int cols, const int *rmap,
                        const int *cmap) {
    for (int r = 0; r < rows; r++) {
        const float *s = src + (int64_t)(rmap ? rmap[r] : r) * src_cols;
        float *d = dst + (int64_t)r * cols;
        if (!cmap) memcpy(d, s, (size_t)cols * sizeof(float));
        else for (int k = 0; k < cols; k++) d[k] = s[cmap[k]];
    }
}

/* Source parameter of dst parameter `name` (its layer index replaced by the kept source layer). */
static int source_param(const st_model *src, const st_prune_plan *p, const char *name, int *layer, const char **suffix) {
    int l = -1, used = 0;
    *layer = -1;
    *suffix = name;
    if (sscanf(name, "model.layers.%d.%n", &l, &used) != 1 && sscanf(name, "h.%d.%n", &l, &used) != 1)
        return st_model_find(src, name);
    char sname[128];
    if (name[0] == 'm') snprintf(sname, sizeof sname, "model.layers.%d.%s", p->layers[l], name + used);
    else snprintf(sname, sizeof sname, "h.%d.%s", p->layers[l], name + used);
    *layer = l;
    *suffix = name + used;
    return st_model_find(src, sname);
}

int st_prune_apply(const st_model *src, const float *src_host, const st_prune_plan *p, const st_backend *be,
                   st_model *dst) {
    st_model_config c = src->cfg;
    int rep = c.n_head / c.n_kv_head;
    c.n_layer = p->n_layer;
    c.n_kv_head = p->groups;
    c.n_head = p->groups * rep;
    c.d_ff = p->chans;
    int rc = st_model_build(dst, &c, be);
    if (rc) return rc;
    float *host = calloc(dst->n_weights, sizeof(float));
    if (!host) { st_model_free(dst); return st_fail(ST_ENOMEM, "out of memory"); }
    for (int i = 0; i < dst->n_params && !rc; i++) {
        const st_param *dp = &dst->params[i];
        int layer;
        const char *suffix;
        int si = source_param(src, p, dp->name, &layer, &suffix);
        if (si < 0) { rc = st_fail(ST_EINVAL, "prune: no source tensor for '%s'", dp->name); break; }
        const st_param *sp = &src->params[si];
        int rows = (int)sp->shape[0], cols = sp->ndim == 2 ? (int)sp->shape[1] : 1;
        int *rmap = NULL, *cmap = NULL;
        if (layer >= 0 && (rc = index_maps(&src->cfg, p, layer, suffix, &rows, &cols, &rmap, &cmap))) break;
        if ((size_t)rows * cols != dp->numel)
            rc = st_fail(ST_ESHAPE, "prune: '%s' has %zu elements, selection gives %d x %d", dp->name, dp->numel, rows,
                         cols);
        else copy_select(host + dp->offset, src_host + sp->offset, sp->ndim == 2 ? sp->shape[1] : 1, rows, cols, rmap,
                         cmap);
        free(rmap);
        free(cmap);
    }
    if (!rc) {
        be->copy_to_device(dst->weights, host, dst->n_weights * sizeof(float));
        st_model_weights_changed(dst);
    } else {
        st_model_free(dst);
    }
    free(host);
    return rc;
}
