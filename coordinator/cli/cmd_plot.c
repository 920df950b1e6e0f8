/* cmd_plot.c — `shardtune plot RUN_DIR --out FILE.svg|FILE.png` (PNG: coordinator/cli/plot_raster.h)
 * Reads RUN_DIR/metrics.jsonl (one JSON object per line: step, loss, lr, tokens_per_s, optional
 * task_loss and val_loss {name: value}, ...) and draws a standalone SVG with three panels sharing the
 * step axis: loss (per-task train losses and validation losses `val[task]` too), learning rate,
 * tokens/s. Lines that are not JSON objects with a numeric "step" are skipped and counted (a run still writing may leave a partial last line). */
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/cli/commands.h"
#include "coordinator/cli/plot_raster.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define PLOT_MAX_SERIES 10 /* loss + up to 9 task losses */

typedef struct {
    char name[64];
    double *x, *y;
    size_t n, cap;
} series;

static int series_push(series *s, double x, double y) {
    if (!isfinite(x) || !isfinite(y)) return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, cap * sizeof *nx);
        if (!nx) return -1;
        s->x = nx;
        double *ny = realloc(s->y, cap * sizeof *ny);
        if (!ny) return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
    return 0;
}

typedef struct {
    series loss[PLOT_MAX_SERIES]; /* [0] = total loss, then tasks */
    int nloss;
    series lr, tps;
    series resumes; /* x = the first step after each resume (metrics rows with "resumed": true) */
} plot_data;

static series *task_series(plot_data *d, const char *kind, const char *name) {
    char label[sizeof d->loss[0].name];
    snprintf(label, sizeof label, "%s[%.40s]", kind, name);
    for (int i = 1; i < d->nloss; i++)
        if (!strcmp(d->loss[i].name, label)) return &d->loss[i];
    if (d->nloss == PLOT_MAX_SERIES) return NULL; /* more tasks than colours: the rest are left out */
    series *s = &d->loss[d->nloss++];
    memcpy(s->name, label, sizeof label);
    return s;
}

/* Returns 1 if the line was used, 0 if skipped, -1 on out of memory. */
static int add_line(plot_data *d, const char *line, size_t len) {
    st_json *obj;
    if (st_json_parse(line, len, &obj) != 0) return 0;
    int used = 0, ok = 1;
    const st_json *step = st_json_get(obj, "step");
    if (obj->type == ST_JSON_OBJECT && step && step->type == ST_JSON_NUMBER) {
        double x = step->number;
        double loss = st_json_get_number(obj, "loss", NAN, &ok);
        double lr = st_json_get_number(obj, "lr", NAN, &ok);
        double tps = st_json_get_number(obj, "tokens_per_s", NAN, &ok);
        int rc = series_push(&d->loss[0], x, loss) | series_push(&d->lr, x, lr) | series_push(&d->tps, x, tps);
        const st_json *resumed = st_json_get(obj, "resumed");
        if (resumed && resumed->type == ST_JSON_BOOL && resumed->boolean) rc |= series_push(&d->resumes, x, 0);
        /* per-task train loss, and the validation loss of the steps that evaluated */
        static const char *const maps[2][2] = {{"task_loss", "loss"}, {"val_loss", "val"}};
        for (int m = 0; m < 2; m++) {
            const st_json *tl = st_json_get(obj, maps[m][0]);
            for (size_t i = 0; tl && tl->type == ST_JSON_OBJECT && i < tl->count; i++) {
                series *s = task_series(d, maps[m][1], tl->keys[i]);
                if (s && tl->items[i]->type == ST_JSON_NUMBER) rc |= series_push(s, x, tl->items[i]->number);
            }
        }
        used = rc ? -1 : 1;
    }
    st_json_free(obj);
    return used;
}

/* Round tick spacing (1, 2, 5 x 10^k) giving about `want` ticks over [lo, hi]. */
static double nice_step(double lo, double hi, int want) {
    double span = hi - lo;
    if (!(span > 0)) return 1;
    double raw = span / want, mag = pow(10, floor(log10(raw))), f = raw / mag;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
}

static void range_of(series *s, int n, int use_x, double *lo, double *hi) {
    *lo = INFINITY;
    *hi = -INFINITY;
    for (int k = 0; k < n; k++)
        for (size_t i = 0; i < s[k].n; i++) {
            double v = use_x ? s[k].x[i] : s[k].y[i];
            if (v < *lo) *lo = v;
            if (v > *hi) *hi = v;
        }
    if (!(*lo <= *hi)) *lo = 0, *hi = 1;
    if (*hi - *lo < 1e-12 * (fabs(*hi) + 1)) { /* flat line: open a band around it */
        double pad = fabs(*hi) > 0 ? fabs(*hi) * 0.05 : 1;
        *lo -= pad;
        *hi += pad;
    }
}

static const char *const colors[PLOT_MAX_SERIES] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

#define W 900.0
#define PANEL_H 240.0
#define ML 90.0
#define MR 160.0
#define MT 30.0
#define MB 45.0

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

static void panel(FILE *f, int index, const char *title, series *s, int n, const series *marks, double xlo, double xhi) {
    double top = index * (PANEL_H + MT + MB) + MT, h = PANEL_H, w = W - ML - MR;
    double ylo, yhi;
    range_of(s, n, 0, &ylo, &yhi);
    fprintf(f, "<g>\n<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"#333\"/>\n", ML, top, w, h);
    fprintf(f, "<text x=\"%g\" y=\"%g\" font-size=\"14\" font-weight=\"bold\">", ML, top - 8);
    xml_text(f, title);
    fputs("</text>\n", f);
#define PX(v) (ML + ((v) - xlo) / (xhi - xlo) * w)
#define PY(v) (top + h - ((v) - ylo) / (yhi - ylo) * h)
    double ys = nice_step(ylo, yhi, 5);
    for (double t = ceil(ylo / ys) * ys; t <= yhi + ys * 1e-9; t += ys) {
        fprintf(f, "<line x1=\"%g\" y1=\"%.2f\" x2=\"%g\" y2=\"%.2f\" stroke=\"#ddd\"/>", ML, PY(t), ML + w, PY(t));
        fprintf(f, "<text x=\"%g\" y=\"%.2f\" font-size=\"11\" text-anchor=\"end\">%.4g</text>\n", ML - 6, PY(t) + 4,
                fabs(t) < ys * 1e-6 ? 0.0 : t);
    }
    double xs = nice_step(xlo, xhi, 8);
    for (double t = ceil(xlo / xs) * xs; t <= xhi + xs * 1e-9; t += xs) {
        fprintf(f, "<line x1=\"%.2f\" y1=\"%g\" x2=\"%.2f\" y2=\"%g\" stroke=\"#333\"/>", PX(t), top + h, PX(t), top + h + 5);
        fprintf(f, "<text x=\"%.2f\" y=\"%g\" font-size=\"11\" text-anchor=\"middle\">%.6g</text>\n", PX(t), top + h + 18, t);
    }
    fprintf(f, "<text x=\"%g\" y=\"%g\" font-size=\"12\" text-anchor=\"middle\">step</text>\n", ML + w / 2, top + h + 36);
    for (int k = 0; k < n; k++) {
        if (s[k].n == 0) continue;
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", colors[k % PLOT_MAX_SERIES]);
        for (size_t i = 0; i < s[k].n; i++) fprintf(f, "%.2f,%.2f ", PX(s[k].x[i]), PY(s[k].y[i]));
        fputs("\"/>\n", f);
        double ly = top + 14 + 18 * k;
        fprintf(f, "<line x1=\"%g\" y1=\"%g\" x2=\"%g\" y2=\"%g\" stroke=\"%s\" stroke-width=\"3\"/>", ML + w + 12, ly - 4,
                ML + w + 32, ly - 4, colors[k % PLOT_MAX_SERIES]);
        fprintf(f, "<text x=\"%g\" y=\"%g\" font-size=\"12\">", ML + w + 38, ly);
        xml_text(f, s[k].name);
        fputs("</text>\n", f);
    }
    /* where the run was resumed from a checkpoint: a dashed vertical line */
    for (size_t i = 0; marks && i < marks->n; i++) {
        fprintf(f, "<line class=\"resume\" x1=\"%.2f\" y1=\"%g\" x2=\"%.2f\" y2=\"%g\" stroke=\"#555\" "
                   "stroke-dasharray=\"4,3\"/>", PX(marks->x[i]), top, PX(marks->x[i]), top + h);
        fprintf(f, "<text x=\"%.2f\" y=\"%g\" font-size=\"10\">resume</text>\n", PX(marks->x[i]) + 3, top + 12);
    }
#undef PX
#undef PY
    fputs("</g>\n", f);
}

/* The same panel as pixels (FILE.png): frame, grid, tick numbers, lines, legend swatches and resume
 * markers; titles and series names are only in the SVG (the raster font has digits only). */
static void panel_png(st_raster *img, int index, series *s, int n, const series *marks, double xlo, double xhi) {
    double top = index * (PANEL_H + MT + MB) + MT, h = PANEL_H, w = W - ML - MR;
    double ylo, yhi;
    range_of(s, n, 0, &ylo, &yhi);
#define PX(v) (ML + ((v) - xlo) / (xhi - xlo) * w)
#define PY(v) (top + h - ((v) - ylo) / (yhi - ylo) * h)
    char num[32];
    double ys = nice_step(ylo, yhi, 5);
    for (double t = ceil(ylo / ys) * ys; t <= yhi + ys * 1e-9; t += ys) {
        st_raster_line(img, ML, PY(t), ML + w, PY(t), 0xdddddd, 1, 0);
        snprintf(num, sizeof num, "%.4g", fabs(t) < ys * 1e-6 ? 0.0 : t);
        st_raster_number(img, ML - 6, PY(t) + 5, num, 0x333333, 2);
    }
    double xs = nice_step(xlo, xhi, 8);
    for (double t = ceil(xlo / xs) * xs; t <= xhi + xs * 1e-9; t += xs) {
        st_raster_line(img, PX(t), top + h, PX(t), top + h + 5, 0x333333, 1, 0);
        snprintf(num, sizeof num, "%.6g", t);
        st_raster_number(img, PX(t), top + h + 20, num, 0x333333, 1);
    }
    for (int k = 0; k < n; k++) {
        uint32_t c = st_raster_color(colors[k % PLOT_MAX_SERIES]);
        for (size_t i = 1; i < s[k].n; i++)
            st_raster_line(img, PX(s[k].x[i - 1]), PY(s[k].y[i - 1]), PX(s[k].x[i]), PY(s[k].y[i]), c, 2, 0);
        if (s[k].n == 1) st_raster_rect(img, PX(s[k].x[0]) - 1, PY(s[k].y[0]) - 1, 3, 3, c, 1);
        if (s[k].n) st_raster_rect(img, ML + w + 12, top + 8 + 18 * k, 20, 4, c, 1);
    }
    for (size_t i = 0; marks && i < marks->n; i++)
        st_raster_line(img, PX(marks->x[i]), top, PX(marks->x[i]), top + h, 0x555555, 1, 4);
    st_raster_rect(img, ML, top, w, h, 0x333333, 0);
#undef PX
#undef PY
}

static int write_png(const char *out, plot_data *d, double xlo, double xhi) {
    st_raster img;
    int rc = st_raster_init(&img, (int)W, (int)(3 * (PANEL_H + MT + MB)));
    if (rc) return rc;
    panel_png(&img, 0, d->loss, d->nloss, &d->resumes, xlo, xhi);
    panel_png(&img, 1, &d->lr, 1, NULL, xlo, xhi);
    panel_png(&img, 2, &d->tps, 1, NULL, xlo, xhi);
    rc = st_raster_write_png(&img, out);
    st_raster_free(&img);
    return rc;
}

static void free_data(plot_data *d) {
    for (int i = 0; i < d->nloss; i++) free(d->loss[i].x), free(d->loss[i].y);
    free(d->lr.x), free(d->lr.y), free(d->tps.x), free(d->tps.y), free(d->resumes.x), free(d->resumes.y);
}

int st_cmd_plot(int argc, char **argv) {
    const char *run_dir = NULL, *out = NULL;
    int force = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--force")) force = 1;
        else if (argv[i][0] != '-' && !run_dir) run_dir = argv[i];
        else {
            st_cli_bad_arg("plot", argv[i]);
            run_dir = out = NULL;
            break;
        }
    }
    if (!run_dir || !out) {
        if (run_dir || out || argc < 2) st_cli_missing("plot", !run_dir ? "RUN_DIR" : "--out FILE.svg|FILE.png");
        fprintf(stderr, "usage: shardtune plot RUN_DIR --out FILE.svg|FILE.png [--force]\n");
        return ST_EXIT_USAGE;
    }
    /* the format follows the extension: .svg or .png (case-insensitive); anything else would be an SVG
     * under a name that says otherwise */
    const char *base = strrchr(out, '/'), *ext;
    ext = strrchr(base ? base + 1 : out, '.');
    if (!ext || (strcasecmp(ext, ".svg") != 0 && strcasecmp(ext, ".png") != 0)) {
        fprintf(stderr, "shardtune plot: error: --out %s: %s%s%s (plot writes FILE.svg or FILE.png)\n", out,
                ext ? "unknown extension '" : "no extension", ext ? ext : "", ext ? "'" : "");
        return ST_EXIT_USAGE;
    }
    char tmp[4200]; /* written here, renamed to OUT when complete */
    int rc0 = st_cli_out_begin("plot", out, force, tmp, sizeof tmp);
    if (rc0) return rc0;
    char path[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    char *text;
    size_t len;
    if (st_read_file(path, &text, &len) != 0) return st_cli_error("plot", st_error());
    plot_data d;
    memset(&d, 0, sizeof d);
    snprintf(d.loss[0].name, sizeof d.loss[0].name, "loss");
    d.nloss = 1;
    snprintf(d.lr.name, sizeof d.lr.name, "lr");
    snprintf(d.tps.name, sizeof d.tps.name, "tokens/s");
    size_t skipped = 0, used = 0;
    for (char *p = text, *end = text + len; p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (n > 0) {
            int rc = add_line(&d, p, n);
            if (rc < 0) {
                free(text);
                free_data(&d);
                return st_cli_error("plot", "out of memory reading metrics");
            }
            rc ? used++ : skipped++;
        }
        p += n + 1;
    }
    free(text);
    if (used == 0) {
        free_data(&d);
        char msg[4200];
        snprintf(msg, sizeof msg, "%s has no metric lines (JSON objects with a numeric \"step\")", path);
        return st_cli_error("plot", msg);
    }
    series all[PLOT_MAX_SERIES + 2];
    memcpy(all, d.loss, (size_t)d.nloss * sizeof *all);
    all[d.nloss] = d.lr;
    all[d.nloss + 1] = d.tps;
    double xlo, xhi;
    range_of(all, d.nloss + 2, 1, &xlo, &xhi);
    size_t out_len = strlen(out);
    if (out_len > 4 && !strcasecmp(out + out_len - 4, ".png")) {
        int rc = write_png(tmp, &d, xlo, xhi);
        free_data(&d);
        if (rc) {
            rc = st_cli_error("plot", st_error());
            st_cli_out_end("plot", out, tmp, 0);
            return rc;
        }
        if ((rc = st_cli_out_end("plot", out, tmp, 1))) return rc;
        printf("wrote %s: %zu steps%s", out, used, skipped ? "" : "\n");
        if (skipped) printf(", %zu lines skipped (not metric JSON)\n", skipped);
        return ST_EXIT_OK;
    }
    FILE *f = fopen(tmp, "w");
    if (!f) {
        free_data(&d);
        char msg[4400];
        snprintf(msg, sizeof msg, "cannot write %s: %s", tmp, strerror(errno));
        return st_cli_error("plot", msg);
    }
    double height = 3 * (PANEL_H + MT + MB);
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" font-family=\"sans-serif\">\n", W, height);
    fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    panel(f, 0, "loss", d.loss, d.nloss, &d.resumes, xlo, xhi);
    panel(f, 1, "learning rate", &d.lr, 1, NULL, xlo, xhi);
    panel(f, 2, "tokens/s", &d.tps, 1, NULL, xlo, xhi);
    fputs("</svg>\n", f);
    int bad = fclose(f) != 0;
    free_data(&d);
    if (bad) {
        st_cli_out_end("plot", out, tmp, 0);
        return st_cli_error("plot", "write failed (disk full?)");
    }
    int rc = st_cli_out_end("plot", out, tmp, 1);
    if (rc) return rc;
    printf("wrote %s: %zu steps%s", out, used, skipped ? "" : "\n");
    if (skipped) printf(", %zu lines skipped (not metric JSON)\n", skipped);
    return ST_EXIT_OK;
}
