/* plot_raster.c — see plot_raster.h. */
#include "coordinator/plot_raster.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

int st_raster_init(st_raster *r, int w, int h) {
    r->w = w;
    r->h = h;
    r->rgb = malloc((size_t)w * h * 3);
    if (!r->rgb) return st_fail(ST_ENOMEM, "out of memory for a %dx%d image", w, h);
    memset(r->rgb, 255, (size_t)w * h * 3);
    return 0;
}

void st_raster_free(st_raster *r) {
    free(r->rgb);
    r->rgb = NULL;
}

uint32_t st_raster_color(const char *hex) { return hex && hex[0] == '#' ? (uint32_t)strtoul(hex + 1, NULL, 16) : 0; }

static void put(st_raster *r, int x, int y, uint32_t c) {
    if (x < 0 || y < 0 || x >= r->w || y >= r->h) return;
    uint8_t *p = r->rgb + ((size_t)y * r->w + x) * 3;
    p[0] = (uint8_t)(c >> 16);
    p[1] = (uint8_t)(c >> 8);
    p[2] = (uint8_t)c;
}

void st_raster_line(st_raster *r, double x0, double y0, double x1, double y1, uint32_t rgb, int width, int dash) {
    double dx = x1 - x0, dy = y1 - y0, len = sqrt(dx * dx + dy * dy);
    int n = (int)ceil(len) + 1;
    if (!isfinite(len) || n > 1 << 20) return;
    for (int i = 0; i < n; i++) {
        if (dash > 0 && (i / dash) % 2) continue;
        double t = n > 1 ? (double)i / (n - 1) : 0;
        int x = (int)lround(x0 + t * dx), y = (int)lround(y0 + t * dy);
        for (int a = 0; a < width; a++)
            for (int b = 0; b < width; b++) put(r, x + a - width / 2, y + b - width / 2, rgb);
    }
}

void st_raster_rect(st_raster *r, double x, double y, double w, double h, uint32_t rgb, int filled) {
    if (filled) {
        for (int j = (int)y; j < (int)(y + h); j++)
            for (int i = (int)x; i < (int)(x + w); i++) put(r, i, j, rgb);
        return;
    }
    st_raster_line(r, x, y, x + w, y, rgb, 1, 0);
    st_raster_line(r, x, y + h, x + w, y + h, rgb, 1, 0);
    st_raster_line(r, x, y, x, y + h, rgb, 1, 0);
    st_raster_line(r, x + w, y, x + w, y + h, rgb, 1, 0);
}

/* 3x5 glyphs, one row per entry, bit 2 = left column */
static const char font_chars[] = "0123456789.-+e";
static const uint8_t font[][5] = {
    {7, 5, 5, 5, 7}, {2, 6, 2, 2, 7}, {7, 1, 7, 4, 7}, {7, 1, 7, 1, 7}, {5, 5, 7, 1, 1}, {7, 4, 7, 1, 7},
    {7, 4, 7, 5, 7}, {7, 1, 1, 1, 1}, {7, 5, 7, 5, 7}, {7, 5, 7, 1, 7}, {0, 0, 0, 0, 2}, {0, 0, 7, 0, 0},
    {0, 2, 7, 2, 0}, {0, 7, 7, 4, 7},
};
enum { GLYPH_SCALE = 2, GLYPH_ADVANCE = 4 * GLYPH_SCALE };

void st_raster_number(st_raster *r, double x, double y, const char *text, uint32_t rgb, int align) {
    int width = (int)strlen(text) * GLYPH_ADVANCE;
    int x0 = (int)x - (align == 1 ? width / 2 : align == 2 ? width : 0), y0 = (int)y - 5 * GLYPH_SCALE;
    for (int k = 0; text[k]; k++) {
        const char *at = strchr(font_chars, text[k]);
        if (!at || !text[k]) continue;
        const uint8_t *g = font[at - font_chars];
        for (int row = 0; row < 5; row++)
            for (int col = 0; col < 3; col++)
                if (g[row] & (4 >> col))
                    for (int a = 0; a < GLYPH_SCALE; a++)
                        for (int b = 0; b < GLYPH_SCALE; b++)
                            put(r, x0 + k * GLYPH_ADVANCE + col * GLYPH_SCALE + a, y0 + row * GLYPH_SCALE + b, rgb);
    }
}

/* ---------------- PNG ---------------- */

static uint32_t crc_table[256];

static uint32_t crc32_update(uint32_t c, const uint8_t *p, size_t n) {
    if (!crc_table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t v = i;
            for (int k = 0; k < 8; k++) v = v & 1 ? 0xEDB88320u ^ (v >> 1) : v >> 1;
            crc_table[i] = v;
        }
    c = ~c;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 255] ^ (c >> 8);
    return ~c;
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static int chunk(FILE *f, const char *type, const uint8_t *data, size_t n) {
    uint8_t head[8];
    be32(head, (uint32_t)n);
    memcpy(head + 4, type, 4);
    uint32_t crc = crc32_update(crc32_update(0, head + 4, 4), data, n);
    uint8_t tail[4];
    be32(tail, crc);
    return fwrite(head, 1, 8, f) == 8 && (n == 0 || fwrite(data, 1, n, f) == n) && fwrite(tail, 1, 4, f) == 4 ? 0 : -1;
}

int st_raster_write_png(const st_raster *r, const char *path) {
    size_t row = (size_t)r->w * 3 + 1, raw_n = row * r->h;
    size_t blocks = (raw_n + 65534) / 65535, z_n = 2 + raw_n + 5 * blocks + 4;
    uint8_t *raw = malloc(raw_n), *z = malloc(z_n);
    if (!raw || !z) {
        free(raw);
        free(z);
        return st_fail(ST_ENOMEM, "out of memory writing %s", path);
    }
    for (int y = 0; y < r->h; y++) {
        raw[y * row] = 0; /* filter: none */
        memcpy(raw + y * row + 1, r->rgb + (size_t)y * r->w * 3, (size_t)r->w * 3);
    }
    /* zlib stream of stored deflate blocks, then Adler-32 of the raw bytes */
    size_t o = 0;
    z[o++] = 0x78;
    z[o++] = 0x01;
    for (size_t at = 0; at < raw_n; at += 65535) {
        size_t n = raw_n - at < 65535 ? raw_n - at : 65535;
        z[o++] = at + n == raw_n; /* BFINAL, BTYPE 00 */
        z[o++] = (uint8_t)n;
        z[o++] = (uint8_t)(n >> 8);
        z[o++] = (uint8_t)~n;
        z[o++] = (uint8_t)(~n >> 8);
        memcpy(z + o, raw + at, n);
        o += n;
    }
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < raw_n; i++) {
        a = (a + raw[i]) % 65521;
        b = (b + a) % 65521;
    }
    be32(z + o, b << 16 | a);
    o += 4;
    uint8_t ihdr[13];
    be32(ihdr, (uint32_t)r->w);
    be32(ihdr + 4, (uint32_t)r->h);
    ihdr[8] = 8; /* bit depth */
    ihdr[9] = 2; /* RGB */
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    FILE *f = fopen(path, "wb");
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    int bad = !f || fwrite(sig, 1, 8, f) != 8 || chunk(f, "IHDR", ihdr, 13) || chunk(f, "IDAT", z, o) ||
              chunk(f, "IEND", NULL, 0);
    if (f && fclose(f) != 0) bad = 1;
    free(raw);
    free(z);
    return bad ? st_fail(ST_EIO, "cannot write %s (disk full?)", path) : 0;
}
