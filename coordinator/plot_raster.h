/* plot_raster.h — a small RGB canvas for `shardtune plot --out FILE.png`: lines (solid or dashed),
 * rectangles, numbers in a built-in 3x5 bitmap font (digits . - + e), and a PNG writer (zlib stream of
 * stored deflate blocks: no compression library needed; a plot of 900x945 pixels is ~2.5 MB).
 * The canvas owns its pixel buffer (st_raster_free). */
#ifndef ST_PLOT_RASTER_H
#define ST_PLOT_RASTER_H

#include <stdint.h>

typedef struct {
    int w, h;
    uint8_t *rgb; /* w*h*3, row-major */
} st_raster;

int st_raster_init(st_raster *r, int w, int h); /* white; 0 or ST_ENOMEM */
void st_raster_free(st_raster *r);
/* colour as 0xRRGGBB; width in pixels (1..4); dash 0 = solid, else on/off run length in pixels */
void st_raster_line(st_raster *r, double x0, double y0, double x1, double y1, uint32_t rgb, int width, int dash);
void st_raster_rect(st_raster *r, double x, double y, double w, double h, uint32_t rgb, int filled);
/* the characters 0-9 . - + e of `text` (others leave a gap); align: 0 left, 1 centre, 2 right of x */
void st_raster_number(st_raster *r, double x, double y, const char *text, uint32_t rgb, int align);
int st_raster_write_png(const st_raster *r, const char *path); /* 0 or ST_EIO naming the path */
uint32_t st_raster_color(const char *hex); /* "#rrggbb" */

#endif
