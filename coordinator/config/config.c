/* config.c — loads a job config: YAML (libyaml document API) + dotted overrides → st_config.
 *
 * Order: defaults, the YAML file, each override in turn, derived defaults (run_dir, checkpoint.dir,
 * task names, stage modules), then cross-key validation. Values are checked for type and range as
 * they are assigned, so messages can carry the file's line:column. The libyaml documents are freed
 * before returning; st_config itself owns no heap memory. */
#include "coordinator/config/config.h"
#include "coordinator/config/config_keys.h"
#include "common/error.h"
#include "common/util.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <yaml.h>

#define MAX_CONFIG_BYTES (16u << 20) /* a job file larger than this is surely not a job file */
#define KEY_PATH_MAX 256

/* Where values come from, for messages: the file, and the override being applied (if any). */
typedef struct {
    const char *file;
    const char *override;
    yaml_document_t *doc;
} walk;

/* ---------- messages ---------- */

static int walk_fail(const walk *w, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int walk_fail(const walk *w, const yaml_node_t *node, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (w->override) return st_fail(ST_ECONFIG, "%s: override '%.200s': %s", w->file, w->override, msg);
    if (node)
        return st_fail(ST_ECONFIG, "%s:%zu:%zu: %s", w->file, node->start_mark.line + 1,
                       node->start_mark.column + 1, msg);
    return st_fail(ST_ECONFIG, "%s: %s", w->file, msg);
}

const char *st_config_prompt_learning(const st_config *c) {
    switch (c->finetune.mode) {
    case ST_FINETUNE_PROMPT_TUNING: return "prompt_tuning";
    case ST_FINETUNE_P_TUNING: return "p_tuning";
    case ST_FINETUNE_PREFIX_TUNING: return "prefix_tuning";
    default: return NULL;
    }
}

static void join_path(char *out, size_t size, const char *prefix, const char *name, size_t name_len) {
    if (name_len > 100) name_len = 100;
    if (prefix[0])
        snprintf(out, size, "%s.%.*s", prefix, (int)name_len, name);
    else
        snprintf(out, size, "%.*s", (int)name_len, name);
}

static int is_null(const yaml_node_t *node);

/* Describes a node's value for "got ..." in messages. */
static const char *node_text(const yaml_node_t *node, char *buf, size_t size) {
    if (is_null(node)) return "nothing";
    if (node->type == YAML_SEQUENCE_NODE) return "a list";
    if (node->type == YAML_MAPPING_NODE) return "a mapping";
    if (node->type != YAML_SCALAR_NODE) return "nothing";
    snprintf(buf, size, "'%.*s'", (int)(node->data.scalar.length > 64 ? 64 : node->data.scalar.length),
             (const char *)node->data.scalar.value);
    return buf;
}

/* ---------- did you mean ---------- */

/* Common names from other trainers, mapped to ours. Used only for suggestions. */
static const char *const key_aliases[][2] = {
    {"learning_rate", "lr"}, {"lr_schedule", "schedule"}, {"scheduler", "schedule"},
    {"lr_scheduler", "schedule"}, {"batch_size", "micro_batch"}, {"micro_batch_size", "micro_batch"},
    {"max_steps", "steps"}, {"num_steps", "steps"}, {"gradient_accumulation_steps", "grad_accum"},
    {"max_grad_norm", "grad_clip"}, {"clip_grad_norm", "grad_clip"}, {"warmup", "warmup_steps"},
    {"adam_betas", "betas"}, {"adam_eps", "eps"}, {"adam_epsilon", "eps"}, {"epsilon", "eps"},
    {"seq_length", "seq_len"}, {"max_seq_len", "seq_len"}, {"block_size", "seq_len"},
    {"zero_stage", "stage"}, {"zero", "sharding"}, {"datasets", "tasks"}, {"data", "tasks"},
    {"output_dir", "run_dir"}, {"save_steps", "every_steps"}, {"save_total_limit", "keep_last"},
    {"eval_steps", "every_steps"}, {"dataset", "path"}, {"file", "path"}, {"logging_steps", "log_every"},
    {"log_interval", "log_every"}, {"layers", "train_layers"}, {"modules", "train_modules"},
    {"num_threads", "threads"}, {"device", "backend"}, {"lr_decay", "layer_lr_decay"},
};

/* Optimal string alignment distance (Levenshtein + adjacent transpositions) over at most the first
 * 64 bytes of each input: longer keys are not typos of ours anyway. */
static int edit_distance(const char *a, size_t na, const char *b, size_t nb) {
    int d[65][65];
    if (na > 64) na = 64;
    if (nb > 64) nb = 64;
    for (size_t i = 0; i <= na; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= nb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        for (size_t j = 1; j <= nb; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[na][nb];
}

static const st_key *find_key(const st_key *table, const char *name, size_t len) {
    for (const st_key *k = table; k->name; k++)
        if (strlen(k->name) == len && memcmp(k->name, name, len) == 0) return k;
    return NULL;
}

/* The valid key of `table` closest to `key`, or NULL when nothing is close enough to be a typo. */
static const char *closest_key(const st_key *table, const char *key, size_t len) {
    const char *best = NULL;
    int best_d = INT_MAX;
    for (const st_key *k = table; k->name; k++) {
        int d = edit_distance(key, len, k->name, strlen(k->name));
        if (d < best_d) best_d = d, best = k->name;
    }
    for (size_t i = 0; i < sizeof key_aliases / sizeof key_aliases[0]; i++) {
        if (!find_key(table, key_aliases[i][1], strlen(key_aliases[i][1]))) continue;
        int d = edit_distance(key, len, key_aliases[i][0], strlen(key_aliases[i][0]));
        if (d < best_d) best_d = d, best = key_aliases[i][1];
    }
    int limit = (int)len / 3 > 2 ? (int)len / 3 : 2;
    if (best && best_d <= limit) return best;
    /* A fragment of a real key ("batch" for "micro_batch") is worth suggesting too. */
    if (len >= 3 && len <= 128) {
        char tmp[129];
        memcpy(tmp, key, len);
        tmp[len] = 0;
        for (const st_key *k = table; k->name; k++)
            if (strstr(k->name, tmp) || (strlen(k->name) >= 3 && strstr(tmp, k->name))) return k->name;
    }
    return NULL;
}

static int unknown_key(const walk *w, const yaml_node_t *node, const st_key *table, const char *prefix,
                       const char *key, size_t len) {
    char path[KEY_PATH_MAX];
    join_path(path, sizeof path, prefix, key, len);
    const char *near = closest_key(table, key, len);
    if (near) {
        char sugg[KEY_PATH_MAX];
        join_path(sugg, sizeof sugg, prefix, near, strlen(near));
        return walk_fail(w, node, "unknown key '%s' (did you mean '%s'?)", path, sugg);
    }
    char list[512] = "";
    size_t used = 0;
    for (const st_key *k = table; k->name && used + 32 < sizeof list; k++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "", k->name);
    if (prefix[0]) return walk_fail(w, node, "unknown key '%s' (valid keys under '%s': %s)", path, prefix, list);
    return walk_fail(w, node, "unknown key '%s' (valid top-level keys: %s)", path, list);
}

/* ---------- scalars ---------- */

static int is_null(const yaml_node_t *node) {
    if (!node) return 1;
    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *s = (const char *)node->data.scalar.value;
    return !strcmp(s, "") || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* The scalar's text, or NULL when the node is not a (non-null) scalar without embedded NULs. */
static const char *scalar(const yaml_node_t *node) {
    if (!node || node->type != YAML_SCALAR_NODE || is_null(node)) return NULL;
    if (strlen((const char *)node->data.scalar.value) != node->data.scalar.length) return NULL;
    return (const char *)node->data.scalar.value;
}

static void describe_int(const st_key *k, char *out, size_t size) {
    if (k->flags & ST_KEY_NO_HI) {
        if (k->lo == 1) snprintf(out, size, "a positive integer");
        else if (k->lo == 0) snprintf(out, size, "a non-negative integer");
        else snprintf(out, size, "an integer >= %.0f", k->lo);
    } else {
        snprintf(out, size, "an integer in %.0f..%.0f", k->lo, k->hi);
    }
}

static void describe_number(double lo, double hi, int flags, char *out, size_t size) {
    if (flags & ST_KEY_NO_HI)
        snprintf(out, size, "a number %s %g", (flags & ST_KEY_LO_OPEN) ? ">" : ">=", lo);
    else
        snprintf(out, size, "a number in %c%g, %g%c", (flags & ST_KEY_LO_OPEN) ? '(' : '[', lo, hi,
                 (flags & ST_KEY_HI_OPEN) ? ')' : ']');
}

static int parse_int(const walk *w, const st_key *k, const char *path, const yaml_node_t *node, int64_t *out) {
    char want[64], got[80];
    describe_int(k, want, sizeof want);
    const char *s = scalar(node);
    if (s) {
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        int in_type = k->kind == ST_KEY_I64 || (v >= INT_MIN && v <= INT_MAX);
        if (*s && !*end && errno == 0 && in_type && (double)v >= k->lo &&
            ((k->flags & ST_KEY_NO_HI) || (double)v <= k->hi)) {
            *out = v;
            return 0;
        }
    }
    return walk_fail(w, node, "%s: expected %s, got %s", path, want, node_text(node, got, sizeof got));
}

static int number_ok(double v, double lo, double hi, int flags) {
    if (!isfinite(v)) return 0;
    if ((flags & ST_KEY_LO_OPEN) ? !(v > lo) : !(v >= lo)) return 0;
    if (flags & ST_KEY_NO_HI) return 1;
    return (flags & ST_KEY_HI_OPEN) ? v < hi : v <= hi;
}

static int parse_double(const walk *w, double lo, double hi, int flags, const char *path,
                        const yaml_node_t *node, double *out) {
    char want[64], got[80];
    describe_number(lo, hi, flags, want, sizeof want);
    const char *s = scalar(node);
    if (s) {
        char *end;
        errno = 0;
        double v = strtod(s, &end);
        if (*s && !*end && errno == 0 && number_ok(v, lo, hi, flags)) {
            *out = v;
            return 0;
        }
    }
    return walk_fail(w, node, "%s: expected %s, got %s", path, want, node_text(node, got, sizeof got));
}

static int parse_bool(const walk *w, const char *path, const yaml_node_t *node, int *out) {
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
    const char *s = scalar(node);
    for (int i = 0; s && i < 3; i++) {
        if (!strcasecmp(s, yes[i])) return *out = 1, 0;
        if (!strcasecmp(s, no[i])) return *out = 0, 0;
    }
    char got[80];
    return walk_fail(w, node, "%s: expected true or false, got %s", path, node_text(node, got, sizeof got));
}

static int parse_string(const walk *w, const char *path, const yaml_node_t *node, char *out, size_t size) {
    char got[80];
    if (is_null(node)) return out[0] = 0, 0;
    const char *s = scalar(node);
    if (!s) return walk_fail(w, node, "%s: expected a string, got %s", path, node_text(node, got, sizeof got));
    if (strlen(s) >= size) return walk_fail(w, node, "%s: value is too long (max %zu bytes)", path, size - 1);
    memcpy(out, s, strlen(s) + 1);
    return 0;
}

static int parse_enum(const walk *w, const st_key *k, const char *path, const yaml_node_t *node, int *out) {
    const char *s = scalar(node);
    for (int i = 0; s && k->names[i]; i++)
        if (!strcmp(s, k->names[i])) return *out = i, 0;
    char list[256] = "", got[80];
    size_t used = 0;
    for (int i = 0; k->names[i]; i++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", k->names[i]);
    return walk_fail(w, node, "%s: expected one of %s, got %s", path, list, node_text(node, got, sizeof got));
}

static const struct { const char *name; int signum; } signal_table[] = {
    {"none", 0}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"TERM", SIGTERM}, {"INT", SIGINT}, {"HUP", SIGHUP},
};
#define N_SIGNALS (sizeof signal_table / sizeof signal_table[0])

const char *st_signal_name(int signum) {
    for (size_t i = 0; i < N_SIGNALS; i++)
        if (signal_table[i].signum == signum) return signal_table[i].name;
    return "?";
}

static int parse_signal(const walk *w, const char *path, const yaml_node_t *node, int *out) {
    const char *s = scalar(node);
    if (s && !strncasecmp(s, "SIG", 3) && strcasecmp(s, "SIG") != 0) s += 3;
    for (size_t i = 0; s && i < N_SIGNALS; i++)
        if (!strcasecmp(s, signal_table[i].name)) return *out = signal_table[i].signum, 0;
    char got[80];
    return walk_fail(w, node, "%s: expected one of none, USR1, USR2, TERM, INT, HUP, got %s", path,
                     node_text(node, got, sizeof got));
}

static int module_bit(const char *s) {
    for (int i = 0; s && st_module_names[i]; i++)
        if (!strcmp(s, st_module_names[i])) return 1 << i;
    return 0;
}

/* A list of module names; a single name or "all" is accepted as a scalar. Never empty. */
static int parse_modules(const walk *w, const char *path, const yaml_node_t *node, unsigned *out) {
    static const char *valid = "attn, mlp, norm, embed, head";
    char got[80];
    if (node && node->type == YAML_SCALAR_NODE && !is_null(node)) {
        const char *s = scalar(node);
        if (s && !strcmp(s, "all")) return *out = ST_MOD_ALL, 0;
        int bit = module_bit(s);
        if (bit) return *out = (unsigned)bit, 0;
        return walk_fail(w, node, "%s: expected a list of %s (or all), got %s", path, valid,
                         node_text(node, got, sizeof got));
    }
    if (!node || node->type != YAML_SEQUENCE_NODE || node->data.sequence.items.top == node->data.sequence.items.start)
        return walk_fail(w, node, "%s: expected a non-empty list of %s, got %s", path, valid,
                         node_text(node, got, sizeof got));
    unsigned mask = 0;
    for (yaml_node_item_t *it = node->data.sequence.items.start; it < node->data.sequence.items.top; it++) {
        yaml_node_t *item = yaml_document_get_node(w->doc, *it);
        int bit = module_bit(scalar(item));
        if (!bit)
            return walk_fail(w, item, "%s: unknown module %s (valid: %s)", path, node_text(item, got, sizeof got),
                             valid);
        mask |= (unsigned)bit;
    }
    *out = mask;
    return 0;
}

/* A non-empty list of names from `names` (a single name is accepted as a scalar) into a bit mask. */
static int parse_nameset(const walk *w, const char *path, const yaml_node_t *node, const char *const *names,
                         unsigned *out) {
    char got[80], valid[256] = "";
    for (int i = 0; names[i]; i++)
        snprintf(valid + strlen(valid), sizeof valid - strlen(valid), "%s%s", i ? ", " : "", names[i]);
    int single = node && node->type == YAML_SCALAR_NODE && !is_null(node);
    if (!single && (!node || node->type != YAML_SEQUENCE_NODE ||
                    node->data.sequence.items.top == node->data.sequence.items.start))
        return walk_fail(w, node, "%s: expected a non-empty list of %s, got %s", path, valid,
                         node_text(node, got, sizeof got));
    unsigned mask = 0;
    yaml_node_item_t one = 0;
    yaml_node_item_t *it = single ? &one : node->data.sequence.items.start;
    yaml_node_item_t *end = single ? &one + 1 : node->data.sequence.items.top;
    for (; it < end; it++) {
        const yaml_node_t *item = single ? node : yaml_document_get_node(w->doc, *it);
        const char *s = scalar(item);
        int bit = -1;
        for (int i = 0; s && names[i]; i++)
            if (!strcmp(s, names[i])) bit = i;
        if (bit < 0)
            return walk_fail(w, item, "%s: unknown name %s (valid: %s)", path, node_text(item, got, sizeof got), valid);
        mask |= 1u << bit;
    }
    *out = mask;
    return 0;
}

static int parse_f64_list(const walk *w, const st_key *k, const char *path, const yaml_node_t *node, double *out) {
    char got[80], want[64];
    describe_number(k->lo, k->hi, k->flags, want, sizeof want);
    size_t n = node && node->type == YAML_SEQUENCE_NODE
                   ? (size_t)(node->data.sequence.items.top - node->data.sequence.items.start) : 0;
    if (n != k->size)
        return walk_fail(w, node, "%s: expected a list of %zu numbers (each %s), got %s", path, k->size, want,
                         node_text(node, got, sizeof got));
    for (size_t i = 0; i < n; i++) {
        char elem_path[KEY_PATH_MAX + 32];
        snprintf(elem_path, sizeof elem_path, "%s.%zu", path, i);
        yaml_node_t *item = yaml_document_get_node(w->doc, node->data.sequence.items.start[i]);
        int rc = parse_double(w, k->lo, k->hi, k->flags, elem_path, item, &out[i]);
        if (rc) return rc;
    }
    return 0;
}

static int parse_resume(const walk *w, const char *path, const yaml_node_t *node, st_config *c) {
    const char *s = scalar(node);
    char got[80];
    if (!s || !*s)
        return walk_fail(w, node, "%s: expected auto, none or a checkpoint path, got %s", path,
                         node_text(node, got, sizeof got));
    if (!strcmp(s, "auto")) return c->resume = ST_RESUME_AUTO, c->resume_path[0] = 0, 0;
    if (!strcmp(s, "none")) return c->resume = ST_RESUME_NONE, c->resume_path[0] = 0, 0;
    c->resume = ST_RESUME_PATH;
    return parse_string(w, path, node, c->resume_path, sizeof c->resume_path);
}

/* ---------- walking mappings and key paths ---------- */

static int apply_mapping(const walk *w, const st_key *table, char *base, const char *path, yaml_node_t *map);

static int list_count(const st_key *k, char *base) { return *(int *)(base + k->count_off); }

static int assign_list(const walk *w, const st_key *k, char *base, const char *path, yaml_node_t *node) {
    char got[80];
    int *count = (int *)(base + k->count_off);
    if (is_null(node)) return *count = 0, 0;
    if (node->type != YAML_SEQUENCE_NODE)
        return walk_fail(w, node, "%s: expected a list of mappings, got %s", path, node_text(node, got, sizeof got));
    long n = node->data.sequence.items.top - node->data.sequence.items.start;
    if (n > k->max) return walk_fail(w, node, "%s: too many entries (%ld, max %d)", path, n, k->max);
    for (long i = 0; i < n; i++) {
        char *elem = base + k->off + (size_t)i * k->size;
        char elem_path[KEY_PATH_MAX + 32];
        snprintf(elem_path, sizeof elem_path, "%s.%ld", path, i);
        k->elem_defaults(elem);
        yaml_node_t *item = yaml_document_get_node(w->doc, node->data.sequence.items.start[i]);
        int rc = apply_mapping(w, k->sub, elem, elem_path, item);
        if (rc) return rc;
    }
    *count = (int)n;
    return 0;
}

/* Assigns `node` to the value described by `k` inside `base`. */
static int assign(const walk *w, const st_key *k, char *base, const char *path, yaml_node_t *node) {
    char *p = base + k->off;
    int64_t i64;
    int rc;
    switch (k->kind) {
    case ST_KEY_SECTION: return apply_mapping(w, k->sub, p, path, node);
    case ST_KEY_LIST: return assign_list(w, k, base, path, node);
    case ST_KEY_I32:
        if ((rc = parse_int(w, k, path, node, &i64))) return rc;
        *(int *)p = (int)i64;
        return 0;
    case ST_KEY_I64: return parse_int(w, k, path, node, (int64_t *)p);
    case ST_KEY_F64: return parse_double(w, k->lo, k->hi, k->flags, path, node, (double *)p);
    case ST_KEY_F64_LIST: return parse_f64_list(w, k, path, node, (double *)p);
    case ST_KEY_BOOL: return parse_bool(w, path, node, (int *)p);
    case ST_KEY_STRING: return parse_string(w, path, node, p, k->size);
    case ST_KEY_ENUM: return parse_enum(w, k, path, node, (int *)p);
    case ST_KEY_MODULES: return parse_modules(w, path, node, (unsigned *)p);
    case ST_KEY_NAMESET: return parse_nameset(w, path, node, k->names, (unsigned *)p);
    case ST_KEY_SIGNAL: return parse_signal(w, path, node, (int *)p);
    case ST_KEY_RESUME: return parse_resume(w, path, node, (st_config *)base);
    case ST_KEY_END: break;
    }
    return walk_fail(w, node, "%s: internal error: bad key kind", path);
}

static int apply_mapping(const walk *w, const st_key *table, char *base, const char *path, yaml_node_t *map) {
    char got[80];
    if (is_null(map)) return 0;
    if (map->type != YAML_MAPPING_NODE) {
        if (path[0])
            return walk_fail(w, map, "%s: expected a mapping of keys, got %s", path, node_text(map, got, sizeof got));
        return walk_fail(w, map, "expected a mapping of keys at the top level, got %s", node_text(map, got, sizeof got));
    }
    for (yaml_node_pair_t *pr = map->data.mapping.pairs.start; pr < map->data.mapping.pairs.top; pr++) {
        yaml_node_t *key = yaml_document_get_node(w->doc, pr->key);
        yaml_node_t *value = yaml_document_get_node(w->doc, pr->value);
        const char *name = scalar(key);
        if (!name) return walk_fail(w, key, "%s%skeys must be plain names, got %s", path, path[0] ? ": " : "",
                                    node_text(key, got, sizeof got));
        size_t len = strlen(name);
        for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < pr; q++) {
            const char *prev = scalar(yaml_document_get_node(w->doc, q->key));
            if (prev && !strcmp(prev, name)) {
                char full[KEY_PATH_MAX];
                join_path(full, sizeof full, path, name, len);
                return walk_fail(w, key, "duplicate key '%s'", full);
            }
        }
        const st_key *k = find_key(table, name, len);
        if (!k) return unknown_key(w, key, table, path, name, len);
        char full[KEY_PATH_MAX];
        join_path(full, sizeof full, path, name, len);
        int rc = assign(w, k, base, full, value);
        if (rc) return rc;
    }
    return 0;
}

/* Parses a list index segment: decimal digits only. */
static int parse_index(const char *s, size_t len, long *out) {
    if (len == 0 || len > 6) return -1;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

/* Assigns `node` at the dotted key path `rest` below the struct `base` described by `table`. */
static int apply_path(const walk *w, const st_key *table, char *base, const char *prefix, const char *rest,
                      yaml_node_t *node) {
    const char *dot = strchr(rest, '.');
    size_t len = dot ? (size_t)(dot - rest) : strlen(rest);
    if (len == 0) return walk_fail(w, NULL, "empty key segment in '%s%s%s'", prefix, prefix[0] ? "." : "", rest);
    const st_key *k = find_key(table, rest, len);
    if (!k) return unknown_key(w, NULL, table, prefix, rest, len);
    char path[KEY_PATH_MAX];
    join_path(path, sizeof path, prefix, rest, len);
    if (!dot) return assign(w, k, base, path, node);

    const char *sub = dot + 1;
    if (k->kind == ST_KEY_SECTION) return apply_path(w, k->sub, base + k->off, path, sub, node);
    if (k->kind != ST_KEY_LIST && k->kind != ST_KEY_F64_LIST)
        return walk_fail(w, NULL, "unknown key '%s.%.100s' ('%s' has no sub-keys)", path, sub, path);

    const char *dot2 = strchr(sub, '.');
    size_t ilen = dot2 ? (size_t)(dot2 - sub) : strlen(sub);
    long idx;
    if (parse_index(sub, ilen, &idx))
        return walk_fail(w, NULL, "'%s.%.*s': expected a list index after '%s.'", path, (int)(ilen > 60 ? 60 : ilen),
                         sub, path);
    char elem_path[KEY_PATH_MAX + 32];
    snprintf(elem_path, sizeof elem_path, "%s.%ld", path, idx);

    if (k->kind == ST_KEY_F64_LIST) {
        if (dot2) return walk_fail(w, NULL, "unknown key '%s.%.100s' ('%s' is a number)", elem_path, dot2 + 1, elem_path);
        if ((size_t)idx >= k->size)
            return walk_fail(w, NULL, "%s: index %ld is out of range ('%s' has %zu entries)", elem_path, idx, path,
                             k->size);
        return parse_double(w, k->lo, k->hi, k->flags, elem_path, node, (double *)(base + k->off) + idx);
    }

    int count = list_count(k, base);
    if (idx > count || idx >= k->max)
        return walk_fail(w, NULL, "%s: index %ld is past the end ('%s' has %d entr%s; use %s.%d to add one)",
                         elem_path, idx, path, count, count == 1 ? "y" : "ies", path, count < k->max ? count : k->max - 1);
    char *elem = base + k->off + (size_t)idx * k->size;
    if (idx == count) {
        k->elem_defaults(elem);
        *(int *)(base + k->count_off) = count + 1;
    }
    if (!dot2) {
        k->elem_defaults(elem);
        return apply_mapping(w, k->sub, elem, elem_path, node);
    }
    return apply_path(w, k->sub, elem, elem_path, dot2 + 1, node);
}

/* ---------- YAML documents ---------- */

static int yaml_problem(const char *file, const char *what, const yaml_parser_t *p) {
    if (p->context)
        return st_fail(ST_ECONFIG, "%s:%zu:%zu: %s: %s (%s at %zu:%zu)", file, p->problem_mark.line + 1,
                       p->problem_mark.column + 1, what, p->problem ? p->problem : "syntax error", p->context,
                       p->context_mark.line + 1, p->context_mark.column + 1);
    return st_fail(ST_ECONFIG, "%s:%zu:%zu: %s: %s", file, p->problem_mark.line + 1, p->problem_mark.column + 1,
                   what, p->problem ? p->problem : "syntax error");
}

/* Loads exactly one YAML document from `text`. On success the caller deletes *doc. */
static int load_document(const char *file, const char *override, const char *text, size_t len,
                         yaml_document_t *doc) {
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) return st_fail(ST_ENOMEM, "%s: cannot initialize the YAML parser", file);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, doc)) {
        int rc;
        if (override) {
            char what[300];
            snprintf(what, sizeof what, "override '%.200s': malformed value", override);
            rc = st_fail(ST_ECONFIG, "%s: %s: %s", file, what, parser.problem ? parser.problem : "syntax error");
        } else {
            rc = yaml_problem(file, "malformed YAML", &parser);
        }
        yaml_parser_delete(&parser);
        return rc;
    }
    yaml_document_t extra;
    int rc = 0;
    if (!yaml_parser_load(&parser, &extra)) {
        rc = override ? st_fail(ST_ECONFIG, "%s: override '%.200s': malformed value: %s", file, override,
                                parser.problem ? parser.problem : "syntax error")
                      : yaml_problem(file, "malformed YAML", &parser);
    } else {
        yaml_node_t *root = yaml_document_get_root_node(&extra);
        if (root)
            rc = override ? st_fail(ST_ECONFIG, "%s: override '%.200s': value holds more than one YAML document",
                                    file, override)
                          : st_fail(ST_ECONFIG, "%s:%zu:1: more than one YAML document (a job file is one mapping)",
                                    file, root->start_mark.line + 1);
        yaml_document_delete(&extra);
    }
    yaml_parser_delete(&parser);
    if (rc) yaml_document_delete(doc);
    return rc;
}

static int apply_override(st_config *c, const char *file, const char *text) {
    walk w = {.file = file, .override = text};
    const char *eq = strchr(text, '=');
    if (!eq) return walk_fail(&w, NULL, "expected dotted.key=value");
    char key[KEY_PATH_MAX];
    const char *ks = text, *ke = eq;
    while (ks < ke && (*ks == ' ' || *ks == '\t')) ks++;
    while (ke > ks && (ke[-1] == ' ' || ke[-1] == '\t')) ke--;
    if (ke == ks) return walk_fail(&w, NULL, "expected dotted.key=value (the key is empty)");
    if ((size_t)(ke - ks) >= sizeof key) return walk_fail(&w, NULL, "key is too long");
    memcpy(key, ks, (size_t)(ke - ks));
    key[ke - ks] = 0;

    yaml_document_t doc;
    int rc = load_document(file, text, eq + 1, strlen(eq + 1), &doc);
    if (rc) return rc;
    w.doc = &doc;
    rc = apply_path(&w, st_config_root_keys, (char *)c, "", key, yaml_document_get_root_node(&doc));
    yaml_document_delete(&doc);
    return rc;
}

/* ---------- derived defaults and validation ---------- */

static int valid_task_name(const char *s) {
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' ||
              *s == '-' || *s == '.'))
            return 0;
    return 1;
}

static int check_layers(const char *file, const char *key, const char *spec) {
    if (!spec[0]) return st_fail(ST_ECONFIG, "%s: %s is required (e.g. \"-4\" or \"0-3,10-11\")", file, key);
    int rc = st_parse_layer_ranges(spec, -1, NULL);
    if (rc) return st_fail_context(rc, "%s: %s", file, key);
    return 0;
}

static int finish_tasks(st_config *c, const char *file) {
    if (c->n_tasks == 0)
        return st_fail(ST_ECONFIG, "%s: tasks: at least one task with a path is required "
                       "(tasks: [{name: qa, path: data/qa.h5}])", file);
    double total_weight = 0;
    for (int i = 0; i < c->n_tasks; i++) {
        st_task_config *t = &c->tasks[i];
        if (!t->path[0]) return st_fail(ST_ECONFIG, "%s: tasks.%d.path is required (the task's dataset file)", file, i);
        if (!t->name[0]) st_path_stem(t->path, t->name, sizeof t->name);
        if (!t->name[0] || !valid_task_name(t->name))
            return st_fail(ST_ECONFIG, "%s: tasks.%d.name: '%s' must be non-empty letters, digits, '_', '-' or '.'",
                           file, i, t->name);
        for (int j = 0; j < i; j++)
            if (!strcmp(c->tasks[j].name, t->name))
                return st_fail(ST_ECONFIG, "%s: tasks.%d.name: duplicate task name '%s' (also tasks.%d)", file, i,
                               t->name, j);
        total_weight += t->weight;
    }
    if (!(total_weight > 0)) return st_fail(ST_ECONFIG, "%s: tasks: every task weight is 0; at least one must be > 0", file);
    return 0;
}

/* ---------- keys of another mode or strategy ----------
 * A value the job's finetune.mode or mixing.strategy never reads (finetune.lora.* outside lora/qlora, ...)
 * would be silently ignored: a user who set it expects it to change the math, so it is refused by name.
 * "Set" is "differs from its default" (the canonical JSON dump lists every key at its value, so a dumped
 * job spec reloads). */

/* 1 when the value of key k differs between the structs a and b (the same table). */
static int key_differs(const st_key *k, const char *a, const char *b) {
    const char *pa = a + k->off, *pb = b + k->off;
    switch (k->kind) {
    case ST_KEY_I32: case ST_KEY_BOOL: case ST_KEY_ENUM: case ST_KEY_SIGNAL: return *(const int *)pa != *(const int *)pb;
    case ST_KEY_I64: return *(const int64_t *)pa != *(const int64_t *)pb;
    case ST_KEY_F64: return *(const double *)pa != *(const double *)pb;
    case ST_KEY_F64_LIST:
        for (size_t i = 0; i < k->size; i++)
            if (((const double *)pa)[i] != ((const double *)pb)[i]) return 1;
        return 0;
    case ST_KEY_STRING: return strncmp(pa, pb, k->size) != 0;
    case ST_KEY_MODULES: case ST_KEY_NAMESET: return *(const unsigned *)pa != *(const unsigned *)pb;
    default: return 0; /* sections and lists are compared key by key by the caller */
    }
}

/* The first key of section `name` (below `table`, whose struct is at a / b) whose value differs from the
 * default; its name in *which. 1 when one does. */
static int section_differs(const st_key *table, const char *name, const char *a, const char *b, const char **which) {
    const st_key *sec = find_key(table, name, strlen(name));
    if (!sec || sec->kind != ST_KEY_SECTION) return 0;
    for (const st_key *k = sec->sub; k->name; k++)
        if (key_differs(k, a + sec->off, b + sec->off)) return *which = k->name, 1;
    return 0;
}

static int ignored_key(const char *file, const char *key, const char *why, const char *fix) {
    return st_fail(ST_ECONFIG, "%s: %s has no effect in %s; %s", file, key, why, fix);
}

/* finetune.lora / qlora / prompt / prefix / train_modules, distill.temperature / alpha, eval.generate.* (without
 * eval.generate.every_steps), mixing.temperature / cap, tasks.N.weight. */
static int check_ignored_keys(const st_config *c, const char *file) {
    st_config *d = malloc(sizeof *d);
    if (!d) return st_fail(ST_ENOMEM, "out of memory");
    st_config_defaults(d);
    const st_key *ft = find_key(st_config_root_keys, "finetune", 8);
    const char *fa = (const char *)c + ft->off, *fb = (const char *)d + ft->off, *which = NULL;
    st_finetune_mode m = c->finetune.mode;
    char key[96], why[96];
    int rc = 0;
    snprintf(why, sizeof why, "finetune.mode %s", st_finetune_mode_name(m));
    static const struct { const char *section, *modes; unsigned mask; } sections[] = {
        {"lora", "lora or qlora", 1u << ST_FINETUNE_LORA | 1u << ST_FINETUNE_QLORA},
        {"qlora", "qlora", 1u << ST_FINETUNE_QLORA},
        {"prompt", "prompt_tuning or p_tuning", 1u << ST_FINETUNE_PROMPT_TUNING | 1u << ST_FINETUNE_P_TUNING},
        {"prefix", "prefix_tuning", 1u << ST_FINETUNE_PREFIX_TUNING},
    };
    for (size_t i = 0; !rc && i < sizeof sections / sizeof sections[0]; i++) {
        if ((sections[i].mask >> m) & 1u) continue;
        if (!section_differs(ft->sub, sections[i].section, fa, fb, &which)) continue;
        snprintf(key, sizeof key, "finetune.%s.%s", sections[i].section, which);
        char fix[96];
        snprintf(fix, sizeof fix, "it is read by finetune.mode %s: set that mode or remove the key", sections[i].modes);
        rc = ignored_key(file, key, why, fix);
    }
    if (!rc && m == ST_FINETUNE_PROMPT_TUNING && c->finetune.prompt.encoder != d->finetune.prompt.encoder)
        rc = ignored_key(file, "finetune.prompt.encoder", why, "the encoder is a p_tuning option: remove the key");
    if (!rc && m != ST_FINETUNE_FROZEN && m != ST_FINETUNE_PROGRESSIVE &&
        c->finetune.train_modules != d->finetune.train_modules)
        rc = ignored_key(file, "finetune.train_modules", why,
                         "it is read by finetune.mode frozen or progressive: set that mode or remove the key");
    if (!rc && !c->distill.teacher[0] && (c->distill.temperature != d->distill.temperature ||
                                          c->distill.alpha != d->distill.alpha ||
                                          c->distill.teacher_dtype != d->distill.teacher_dtype))
        rc = ignored_key(file,
                         c->distill.temperature != d->distill.temperature ? "distill.temperature"
                         : c->distill.alpha != d->distill.alpha           ? "distill.alpha"
                                                                          : "distill.teacher_dtype",
                         "a job without distill.teacher", "set distill.teacher (a model directory) or remove the key");
    const st_key *ev = find_key(st_config_root_keys, "eval", 4); /* eval.generate.* without sampling */
    if (!rc && c->eval.generate.every_steps == 0 &&
        section_differs(ev->sub, "generate", (const char *)c + ev->off, (const char *)d + ev->off, &which)) {
        snprintf(key, sizeof key, "eval.generate.%s", which);
        rc = ignored_key(file, key, "a job with eval.generate.every_steps 0 (no sampling)",
                         "set eval.generate.every_steps (sample every N steps) or remove the key");
    }
    snprintf(why, sizeof why, "mixing.strategy %s", st_mixing_name(c->mixing.strategy));
    if (!rc && c->mixing.strategy != ST_MIXING_TEMPERATURE && c->mixing.temperature != d->mixing.temperature)
        rc = ignored_key(file, "mixing.temperature", why, "it is read by mixing.strategy temperature: set that "
                         "strategy or remove the key");
    if (!rc && c->mixing.strategy == ST_MIXING_WEIGHTS && c->mixing.cap != d->mixing.cap)
        rc = ignored_key(file, "mixing.cap", why, "the tasks' weights are the sampling rates: remove the key");
    for (int i = 0; !rc && c->mixing.strategy != ST_MIXING_WEIGHTS && i < c->n_tasks; i++)
        if (c->tasks[i].weight != 1.0) {
            snprintf(key, sizeof key, "tasks.%d.weight", i);
            rc = ignored_key(file, key, why, "it is read by mixing.strategy weights: set that strategy or remove "
                             "the key");
        }
    free(d);
    return rc;
}

static int finish_finetune(st_config *c, const char *file) {
    int rc = check_layers(file, "finetune.train_layers", c->finetune.train_layers);
    if (rc) return rc;
    /* full trains every layer: a layer choice there would be silently ignored */
    if (c->finetune.mode == ST_FINETUNE_FULL && strcmp(c->finetune.train_layers, "-4") != 0)
        return st_fail(ST_ECONFIG, "%s: finetune.train_layers: '%s' has no effect in finetune.mode full (every layer "
                       "trains); set finetune.mode: frozen to train only these layers, or remove the key", file,
                       c->finetune.train_layers);
    /* the adapter modes train adapters (finetune.lora.layers picks their layers) or a prompt: a layer choice
     * for the base would be silently ignored too */
    if (c->finetune.mode != ST_FINETUNE_FULL && c->finetune.mode != ST_FINETUNE_FROZEN &&
        c->finetune.mode != ST_FINETUNE_PROGRESSIVE && strcmp(c->finetune.train_layers, "-4") != 0)
        return st_fail(ST_ECONFIG, "%s: finetune.train_layers: '%s' has no effect in finetune.mode %s (the base "
                       "stays frozen)%s", file, c->finetune.train_layers, st_finetune_mode_name(c->finetune.mode),
                       c->finetune.mode == ST_FINETUNE_LORA || c->finetune.mode == ST_FINETUNE_QLORA
                           ? "; finetune.lora.layers picks the layers that get adapters"
                           : "; remove the key");
    if (c->finetune.mode != ST_FINETUNE_PROGRESSIVE && (c->finetune.n_stages > 0 || c->finetune.unfreeze_every > 0))
        return st_fail(ST_ECONFIG, "%s: finetune.%s has no effect in finetune.mode %s; set finetune.mode: progressive "
                       "or remove the key", file, c->finetune.n_stages > 0 ? "stages" : "unfreeze_every",
                       st_finetune_mode_name(c->finetune.mode));
    for (int i = 0; i < c->finetune.n_stages; i++) {
        st_stage_config *s = &c->finetune.stages[i];
        char key[64];
        snprintf(key, sizeof key, "finetune.stages.%d.train_layers", i);
        if ((rc = check_layers(file, key, s->train_layers))) return rc;
        if (!s->train_modules) s->train_modules = c->finetune.train_modules;
        if (i == 0 && s->at_step != 0)
            return st_fail(ST_ECONFIG, "%s: finetune.stages.0.at_step: the first stage must start at step 0, got %" PRId64,
                           file, s->at_step);
        if (i > 0 && s->at_step <= s[-1].at_step)
            return st_fail(ST_ECONFIG, "%s: finetune.stages.%d.at_step: stages must start at increasing steps "
                           "(%" PRId64 " after %" PRId64 ")", file, i, s->at_step, s[-1].at_step);
    }
    if ((rc = check_layers(file, "finetune.lora.layers", c->finetune.lora.layers))) return rc;
    if (c->memory.checkpoint_dtype == ST_PRECISION_BF16 && (!c->memory.activation_checkpointing ||
                                                            c->precision != ST_PRECISION_BF16))
        return st_fail(ST_ECONFIG, "%s: memory.checkpoint_dtype: bf16 needs memory.activation_checkpointing: true and "
                       "precision: bf16", file);
    if ((rc = check_ignored_keys(c, file))) return rc;
    if (c->finetune.mode == ST_FINETUNE_P_TUNING && c->finetune.prompt.init_text[0])
        return st_fail(ST_ECONFIG, "%s: finetune.prompt.init_text is a prompt_tuning option (p_tuning has no text init)",
                       file);
    if (c->finetune.mode == ST_FINETUNE_PROGRESSIVE) {
        if (c->finetune.n_stages == 0 && c->finetune.unfreeze_every == 0)
            return st_fail(ST_ECONFIG, "%s: finetune.mode: progressive needs finetune.stages or finetune.unfreeze_every",
                           file);
        if (c->finetune.n_stages > 0 && c->finetune.unfreeze_every > 0)
            return st_fail(ST_ECONFIG, "%s: finetune.unfreeze_every: use either finetune.stages or "
                           "finetune.unfreeze_every, not both", file);
    }
    return 0;
}

/* eval.generate: sample answers from the current weights (coordinator/trainer/train_samples.c): every
 * sharding stage (ZeRO-3 gathers a layer at a time) and every fine-tuning mode (LoRA, DoRA, qlora: the
 * adapters folded in per layer; prompt learning: its virtual tokens lead, worker/generate.c). */
static int finish_eval_generate(const st_config *c, const char *file) {
    if (c->eval.generate.every_steps == 0) return 0;
    if (!c->eval.generate.prompts[0])
        return st_fail(ST_ECONFIG, "%s: eval.generate.prompts: a prompts JSONL file (generate's input format) is "
                       "required when eval.generate.every_steps is set", file);
    return 0;
}

/* out = a + b; -1 (out untouched) when it does not fit. */
static int concat(char *out, size_t size, const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na + nb >= size) return -1;
    memmove(out, a, na);
    memcpy(out + na, b, nb + 1);
    return 0;
}

static int finish(st_config *c, const char *file, const char *stem) {
    if (!c->model.path[0]) return st_fail(ST_ECONFIG, "%s: model.path is required (the model directory)", file);
    if (!c->run_dir[0] && concat(c->run_dir, sizeof c->run_dir, "runs/", stem[0] ? stem : "job"))
        return st_fail(ST_ECONFIG, "%s: run_dir: the job file name is too long to derive it", file);
    if (!c->checkpoint.dir[0] && concat(c->checkpoint.dir, sizeof c->checkpoint.dir, c->run_dir, "/checkpoints"))
        return st_fail(ST_ECONFIG, "%s: checkpoint.dir: run_dir is too long to derive it", file);
    if (c->train.steps > 0 && c->train.epochs > 0)
        return st_fail(ST_ECONFIG, "%s: train.steps and train.epochs are both given: use exactly one of them", file);
    if (c->train.steps == 0 && c->train.epochs == 0) c->train.steps = 1000; /* DESIGN.md's default */
    int rc = finish_tasks(c, file);
    if (rc) return rc;
    if ((rc = finish_finetune(c, file))) return rc;
    if ((rc = finish_eval_generate(c, file))) return rc;
    double sum = c->split[0] + c->split[1] + c->split[2];
    if (fabs(sum - 1.0) > 1e-6)
        return st_fail(ST_ECONFIG, "%s: split: the three fractions must sum to 1, got %g + %g + %g = %g", file,
                       c->split[0], c->split[1], c->split[2], sum);
    if (!(c->split[0] > 0)) return st_fail(ST_ECONFIG, "%s: split.0: the train fraction must be > 0", file);
    if (c->train.packing == ST_PACKING_DOCUMENTS && c->distill.teacher[0]) /* the teacher's forward knows no document positions */
        return st_fail(ST_ECONFIG, "%s: train.packing: documents cannot be combined with distill.teacher", file);
    if (c->train.packing == ST_PACKING_DOCUMENTS && st_config_prompt_learning(c))
        return st_fail(ST_ECONFIG, "%s: train.packing: documents cannot be combined with finetune.mode %s "
                                   "(the virtual tokens would open every packed document)", file,
                       st_config_prompt_learning(c));
    /* sizes the trainer multiplies in int / size_t: refused here, naming the keys, not overflowed later */
    int64_t per_micro = (int64_t)c->train.micro_batch * c->train.seq_len;
    if (per_micro > (1 << 26))
        return st_fail(ST_ECONFIG, "%s: train.micro_batch x train.seq_len = %" PRId64 " tokens per micro-batch is over "
                       "the limit of %d", file, per_micro, 1 << 26);
    if (per_micro * c->train.grad_accum > INT_MAX)
        return st_fail(ST_ECONFIG, "%s: train.micro_batch x train.grad_accum x train.seq_len = %" PRId64 " tokens per "
                       "rank and step is over the limit of %d", file, per_micro * c->train.grad_accum, INT_MAX);
    if (c->monitor.publish[0] && !strcmp(c->monitor.publish, c->monitor.control) && !strstr(c->monitor.publish, ":*"))
        return st_fail(ST_ECONFIG, "%s: monitor.control: must differ from monitor.publish (both '%s')", file,
                       c->monitor.control);
    return 0;
}

/* ---------- entry points ---------- */

static int load_text(st_config *c, const char *file, const char *stem, const char *text, size_t len,
                     int n_overrides, char **overrides) {
    st_config_defaults(c);
    snprintf(c->source, sizeof c->source, "%s", file);
    if (strlen(text) != len) return st_fail(ST_ECONFIG, "%s: contains a NUL byte (not a YAML text file)", file);
    yaml_document_t doc;
    int rc = load_document(file, NULL, text, len, &doc);
    if (rc) return rc;
    walk w = {.file = file, .doc = &doc};
    rc = apply_mapping(&w, st_config_root_keys, (char *)c, "", yaml_document_get_root_node(&doc));
    yaml_document_delete(&doc);
    if (rc) return rc;
    if (n_overrides > 0 && !overrides) return st_fail(ST_EINVAL, "%s: overrides array is NULL", file);
    for (int i = 0; i < n_overrides; i++) {
        if (!overrides[i]) return st_fail(ST_EINVAL, "%s: override %d is NULL", file, i);
        if ((rc = apply_override(c, file, overrides[i]))) return rc;
    }
    return finish(c, file, stem);
}

int st_config_load_string(st_config *c, const char *yaml_text, int n_overrides, char **overrides) {
    if (!c || !yaml_text) return st_fail(ST_EINVAL, "st_config_load_string: NULL argument");
    return load_text(c, "<string>", "job", yaml_text, strlen(yaml_text), n_overrides, overrides);
}

int st_config_load(st_config *c, const char *yaml_path, int n_overrides, char **overrides) {
    if (!c || !yaml_path) return st_fail(ST_EINVAL, "st_config_load: NULL argument");
    struct stat st;
    if (stat(yaml_path, &st) != 0)
        return st_fail(ST_EIO, "%s: cannot read the job file: %s", yaml_path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return st_fail(ST_EIO, "%s: the job file is not a regular file", yaml_path);
    if ((uint64_t)st.st_size > MAX_CONFIG_BYTES)
        return st_fail(ST_ECONFIG, "%s: the job file is too large (%lld bytes, max %u)", yaml_path,
                       (long long)st.st_size, MAX_CONFIG_BYTES);
    char *text;
    size_t len;
    int rc = st_read_file(yaml_path, &text, &len);
    if (rc) return rc;
    char stem[ST_CFG_PATH_MAX];
    st_path_stem(yaml_path, stem, sizeof stem);
    rc = load_text(c, yaml_path, stem, text, len, n_overrides, overrides);
    free(text);
    return rc;
}
