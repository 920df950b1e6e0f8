/* config_layers.c — the train_layers mini-language (see st_parse_layer_ranges in config.h).
 *
 * "0-3,10-11" (inclusive ranges), "5" (one layer), "-4" (the last four), "all", "none". Items may
 * overlap; the result is their union. Called once without a model to check syntax (config load) and
 * again by the planner with the model's layer count. Writes only into the caller's mask. */
#include "coordinator/config/config.h"
#include "common/error.h"

#include <string.h>

#define SPEC_SHOWN 60 /* bytes of the spec quoted in messages */

/* Reads up to 9 decimal digits at *p; returns -1 when there are none (or too many). */
static long read_number(const char **p) {
    const char *s = *p;
    long v = 0;
    int n = 0;
    while (*s >= '0' && *s <= '9') {
        if (++n > 9) return -1;
        v = v * 10 + (*s++ - '0');
    }
    if (n == 0) return -1;
    *p = s;
    return v;
}

static const char *skip_blanks(const char *s) {
    while (*s == ' ' || *s == '\t') s++;
    return s;
}

static int is_word(const char *spec, const char *word) {
    const char *s = skip_blanks(spec);
    size_t n = strlen(word);
    return strncmp(s, word, n) == 0 && *skip_blanks(s + n) == 0;
}

/* Parses one item [start, end) and marks it. */
static int parse_item(const char *spec, const char *start, const char *end, int n_layers, unsigned char *mask) {
    int item_len = (int)(end - start);
    const char *p = skip_blanks(start);
    while (end > p && (end[-1] == ' ' || end[-1] == '\t')) end--;
    if (p == end)
        return st_fail(ST_ECONFIG, "layer spec '%.*s': empty item (write e.g. \"0-3,10-11\" or \"-4\")", SPEC_SHOWN,
                       spec);
    long lo, hi;
    const char *q = p;
    if (*q == '-') { /* "-K": the last K layers */
        q++;
        long k = read_number(&q);
        if (k < 0 || q != end)
            return st_fail(ST_ECONFIG, "layer spec '%.*s': malformed item '%.*s' (expected N, A-B or -K)",
                           SPEC_SHOWN, spec, item_len, start);
        if (k == 0) return st_fail(ST_ECONFIG, "layer spec '%.*s': '-0' selects no layers", SPEC_SHOWN, spec);
        if (n_layers < 0) return 0;
        if (k > n_layers)
            return st_fail(ST_ECONFIG, "layer spec '%.*s': '-%ld' asks for the last %ld layers but the model has %d",
                           SPEC_SHOWN, spec, k, k, n_layers);
        lo = n_layers - k;
        hi = n_layers - 1;
    } else {
        lo = read_number(&q);
        hi = lo;
        if (lo >= 0 && q != end && *q == '-') {
            q++;
            hi = read_number(&q);
        }
        if (lo < 0 || hi < 0 || q != end)
            return st_fail(ST_ECONFIG, "layer spec '%.*s': malformed item '%.*s' (expected N, A-B or -K)",
                           SPEC_SHOWN, spec, item_len, start);
        if (hi < lo)
            return st_fail(ST_ECONFIG, "layer spec '%.*s': reversed range '%ld-%ld' (write '%ld-%ld')", SPEC_SHOWN,
                           spec, lo, hi, hi, lo);
        if (n_layers < 0) return 0;
        if (hi >= n_layers)
            return st_fail(ST_ECONFIG, "layer spec '%.*s': layer %ld is out of range (the model has %d layers: 0-%d)",
                           SPEC_SHOWN, spec, hi, n_layers, n_layers - 1);
    }
    for (long i = lo; i <= hi; i++) mask[i] = 1;
    return 0;
}

int st_parse_layer_ranges(const char *spec, int n_layers, unsigned char *mask_out) {
    if (!spec) return st_fail(ST_EINVAL, "layer spec is NULL");
    if (n_layers > 0 && !mask_out) return st_fail(ST_EINVAL, "layer spec '%.*s': no mask given", SPEC_SHOWN, spec);
    if (n_layers > 0) memset(mask_out, 0, (size_t)n_layers);
    if (is_word(spec, "all")) {
        if (n_layers > 0) memset(mask_out, 1, (size_t)n_layers);
        return 0;
    }
    if (is_word(spec, "none")) return 0;
    if (*skip_blanks(spec) == 0)
        return st_fail(ST_ECONFIG, "layer spec is empty (write e.g. \"0-3,10-11\", \"-4\" or \"all\")");
    const char *start = spec;
    for (;;) {
        const char *comma = strchr(start, ',');
        const char *end = comma ? comma : start + strlen(start);
        int rc = parse_item(spec, start, end, n_layers, mask_out);
        if (rc) return rc;
        if (!comma) return 0;
        start = comma + 1;
    }
}
