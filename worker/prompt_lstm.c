/* prompt_lstm.c — the bidirectional LSTM of P-tuning's LSTM prompt encoder (see prompt_lstm.h): forward
 * over the V virtual tokens and backpropagation through time, host loops in double accumulators. */
#include "worker/prompt_lstm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

struct st_plstm {
    int V, C, H;
    float *out[ST_PLSTM_LAYERS];  /* [V, 2H] each layer's output */
    double *act[ST_PLSTM_LAYERS][2]; /* [V, 4H] activated gates i, f, g, o per layer and direction */
    double *c[ST_PLSTM_LAYERS][2];   /* [V, H] cell states */
    double *tc[ST_PLSTM_LAYERS][2];  /* [V, H] tanh of the cell states */
    double *dz, *dh, *dc, *dhn;     /* [4H], [H], [H], [H] */
    float *dmid;                    /* [V, 2H] gradient of the first layer's output */
};

int st_plstm_init(st_plstm **out, int V, int C, int H) {
    st_plstm *s = calloc(1, sizeof *s);
    if (!s) return st_fail(ST_ENOMEM, "out of memory for the LSTM prompt encoder");
    s->V = V, s->C = C, s->H = H;
    int bad = 0;
    for (int l = 0; l < ST_PLSTM_LAYERS; l++) {
        bad |= !(s->out[l] = malloc((size_t)V * 2 * H * sizeof(float)));
        for (int d = 0; d < 2; d++) {
            bad |= !(s->act[l][d] = malloc((size_t)V * 4 * H * sizeof(double)));
            bad |= !(s->c[l][d] = malloc((size_t)V * H * sizeof(double)));
            bad |= !(s->tc[l][d] = malloc((size_t)V * H * sizeof(double)));
        }
    }
    bad |= !(s->dz = malloc((size_t)7 * H * sizeof(double))) || !(s->dmid = malloc((size_t)V * 2 * H * sizeof(float)));
    if (!bad) {
        s->dh = s->dz + 4 * H;
        s->dc = s->dh + H;
        s->dhn = s->dc + H;
    }
    *out = s;
    return bad ? st_fail(ST_ENOMEM, "out of memory for the LSTM prompt encoder") : 0;
}

void st_plstm_free(st_plstm *s) {
    if (!s) return;
    for (int l = 0; l < ST_PLSTM_LAYERS; l++) {
        free(s->out[l]);
        for (int d = 0; d < 2; d++) {
            free(s->act[l][d]);
            free(s->c[l][d]);
            free(s->tc[l][d]);
        }
    }
    free(s->dz);
    free(s->dmid);
    free(s);
}

static double sigm(double z) { return 1.0 / (1.0 + exp(-z)); }

/* One direction of one layer: x [V, in] -> out[:, d*H : d*H + H]. w: weight_ih [4H, in], weight_hh [4H, H],
 * bias_ih, bias_hh [4H] (torch.nn.LSTM, gate order i, f, g, o). */
static void dir_forward(st_plstm *s, int l, int d, const float *x, int in, const float *const w[4]) {
    int V = s->V, H = s->H;
    double *act = s->act[l][d], *c = s->c[l][d], *tc = s->tc[l][d];
    float *out = s->out[l];
    const float *hp = NULL;
    const double *cp = NULL;
    for (int k = 0; k < V; k++) {
        int t = d ? V - 1 - k : k;
        const float *xt = x + (size_t)t * in;
        for (int r = 0; r < 4 * H; r++) {
            double z = (double)w[2][r] + w[3][r];
            const float *wi = w[0] + (size_t)r * in, *wh = w[1] + (size_t)r * H;
            for (int j = 0; j < in; j++) z += (double)wi[j] * xt[j];
            if (hp)
                for (int j = 0; j < H; j++) z += (double)wh[j] * hp[j];
            act[(size_t)t * 4 * H + r] = r / H == 2 ? tanh(z) : sigm(z);
        }
        const double *a = act + (size_t)t * 4 * H;
        double *ct = c + (size_t)t * H;
        float *ht = out + (size_t)t * 2 * H + d * H;
        for (int j = 0; j < H; j++) {
            ct[j] = (cp ? a[H + j] * cp[j] : 0.0) + a[j] * a[2 * H + j];
            tc[(size_t)t * H + j] = tanh(ct[j]);
            ht[j] = (float)(a[3 * H + j] * tc[(size_t)t * H + j]);
        }
        hp = ht;
        cp = ct;
    }
}

void st_plstm_forward(st_plstm *s, const float *x, const float *const w[4 * 2 * ST_PLSTM_LAYERS], float *out) {
    for (int l = 0; l < ST_PLSTM_LAYERS; l++) {
        const float *in = l ? s->out[l - 1] : x;
        for (int d = 0; d < 2; d++) dir_forward(s, l, d, in, l ? 2 * s->H : s->C, w + (l * 2 + d) * 4);
    }
    memcpy(out, s->out[ST_PLSTM_LAYERS - 1], (size_t)s->V * 2 * s->H * sizeof(float));
}

/* Backpropagation through time of one direction: dout [V, 2H] (its columns d*H..), dx [V, in] (+=). */
static void dir_backward(st_plstm *s, int l, int d, const float *x, int in, const float *const w[4], float *const g[4],
                         const float *dout, float *dx) {
    int V = s->V, H = s->H;
    const double *act = s->act[l][d], *c = s->c[l][d], *tc = s->tc[l][d];
    const float *out = s->out[l];
    double *dz = s->dz, *dh = s->dh, *dc = s->dc, *dhn = s->dhn;
    memset(dc, 0, (size_t)H * sizeof(double));
    memset(dhn, 0, (size_t)H * sizeof(double));
    for (int k = V - 1; k >= 0; k--) {
        int t = d ? V - 1 - k : k, tp = d ? t + 1 : t - 1; /* tp: the step processed before t */
        int first = k == 0;
        const double *a = act + (size_t)t * 4 * H, *cp = first ? NULL : c + (size_t)tp * H;
        const float *hp = first ? NULL : out + (size_t)tp * 2 * H + d * H;
        for (int j = 0; j < H; j++) {
            dh[j] = dout[(size_t)t * 2 * H + d * H + j] + dhn[j];
            double i = a[j], f = a[H + j], gg = a[2 * H + j], o = a[3 * H + j], th = tc[(size_t)t * H + j];
            double dct = dh[j] * o * (1 - th * th) + dc[j];
            dz[j] = dct * gg * i * (1 - i);
            dz[H + j] = (cp ? dct * cp[j] : 0.0) * f * (1 - f);
            dz[2 * H + j] = dct * i * (1 - gg * gg);
            dz[3 * H + j] = dh[j] * th * o * (1 - o);
            dc[j] = dct * f;
        }
        const float *xt = x + (size_t)t * in;
        float *dxt = dx + (size_t)t * in;
        memset(dhn, 0, (size_t)H * sizeof(double));
        for (int r = 0; r < 4 * H; r++) {
            const float *wi = w[0] + (size_t)r * in, *wh = w[1] + (size_t)r * H;
            if (g[0])
                for (int j = 0; j < in; j++) g[0][(size_t)r * in + j] += (float)(dz[r] * xt[j]);
            if (g[1] && hp)
                for (int j = 0; j < H; j++) g[1][(size_t)r * H + j] += (float)(dz[r] * hp[j]);
            if (g[2]) g[2][r] += (float)dz[r];
            if (g[3]) g[3][r] += (float)dz[r];
            for (int j = 0; j < in; j++) dxt[j] += (float)(dz[r] * wi[j]);
            for (int j = 0; j < H; j++) dhn[j] += dz[r] * wh[j];
        }
    }
}

void st_plstm_backward(st_plstm *s, const float *x, const float *const w[4 * 2 * ST_PLSTM_LAYERS],
                       float *const g[4 * 2 * ST_PLSTM_LAYERS], const float *dout, float *dx) {
    const float *dy = dout;
    for (int l = ST_PLSTM_LAYERS - 1; l >= 0; l--) {
        const float *in = l ? s->out[l - 1] : x;
        float *din = l ? s->dmid : dx;
        if (l) memset(din, 0, (size_t)s->V * 2 * s->H * sizeof(float));
        for (int d = 0; d < 2; d++)
            dir_backward(s, l, d, in, l ? 2 * s->H : s->C, w + (l * 2 + d) * 4, g + (l * 2 + d) * 4, dy, din);
        dy = din;
    }
}
