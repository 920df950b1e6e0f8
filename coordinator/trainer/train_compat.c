/* train_compat.c — may this checkpoint continue this job? A checkpoint that exists but belongs to a
 * different run (other seed, sequence length, split or mixing; another model config; another base
 * model with the same shapes) is refused with a line that names what differs and how to proceed,
 * instead of being silently truncated, reinterpreted or skipped for a fresh start. */
#include "coordinator/trainer/train_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "common/error.h"
#include "common/json.h"

#define HOW_TO_PROCEED "to start over set resume: none (the run_dir's checkpoints and metrics are then replaced) or use a new run_dir"

/* Job keys that decide which samples the run sees: a resume must keep them. */
static const char *const same_keys[] = {"seed", "train.seq_len", "split", "mixing.strategy", "mixing.temperature",
                                        "mixing.cap", NULL};

static const st_json *json_at(const st_json *root, const char *dotted) {
    char part[64];
    const st_json *v = root;
    while (v && *dotted) {
        const char *dot = strchr(dotted, '.');
        size_t n = dot ? (size_t)(dot - dotted) : strlen(dotted);
        if (n >= sizeof part) return NULL;
        memcpy(part, dotted, n);
        part[n] = 0;
        v = st_json_get(v, part);
        dotted += n + (dot ? 1 : 0);
    }
    return v;
}

/* A short text of a JSON value for messages ("7", "'cosine'", "[0.8, 0.1, 0.1]", "absent"). */
static void json_text(const st_json *v, char *out, size_t size) {
    if (!v) { snprintf(out, size, "absent"); return; }
    switch (v->type) {
    case ST_JSON_NULL: snprintf(out, size, "null"); break;
    case ST_JSON_BOOL: snprintf(out, size, "%s", v->boolean ? "true" : "false"); break;
    case ST_JSON_NUMBER: snprintf(out, size, "%.15g", v->number); break;
    case ST_JSON_STRING: snprintf(out, size, "'%.80s'", v->string); break;
    case ST_JSON_ARRAY: {
        size_t used = (size_t)snprintf(out, size, "[");
        for (size_t i = 0; i < v->count && used + 2 < size; i++) {
            char item[64];
            json_text(v->items[i], item, sizeof item);
            used += (size_t)snprintf(out + used, size - used, "%s%s", i ? ", " : "", item);
        }
        if (used + 2 < size) snprintf(out + used, size - used, "]");
        break;
    }
    case ST_JSON_OBJECT: snprintf(out, size, "{...}"); break;
    }
}

static int json_same(const st_json *a, const st_json *b) {
    char x[256], y[256];
    json_text(a, x, sizeof x);
    json_text(b, y, sizeof y);
    return !strcmp(x, y);
}

/* model config keys that do not describe the model (tool versions, dtype of the files) */
static int incidental_key(const char *k) {
    return k[0] == '_' || !strcmp(k, "transformers_version") || !strcmp(k, "torch_dtype") || !strcmp(k, "dtype") ||
           !strcmp(k, "use_cache") || !strcmp(k, "architectures");
}

static int parse(const char *text, st_json **out) { return text ? st_json_parse(text, strlen(text), out) : ST_EFORMAT; }

static int check_job(const trainer *t, const st_ckpt_info *info, const char *path) {
    st_json *old = NULL, *now = NULL;
    int rc = 0;
    if (parse(info->job_spec, &old) || parse(t->job_json, &now)) {
        st_json_free(old);
        st_json_free(now);
        return 0; /* an old checkpoint without a readable job spec: the loader state still guards it */
    }
    char diff[700] = "";
    size_t used = 0;
    for (int i = 0; same_keys[i]; i++) {
        const st_json *a = json_at(old, same_keys[i]), *b = json_at(now, same_keys[i]);
        if (!a || json_same(a, b)) continue;
        char x[200], y[200];
        json_text(a, x, sizeof x);
        json_text(b, y, sizeof y);
        if (used + 8 < sizeof diff)
            used += (size_t)snprintf(diff + used, sizeof diff - used, "%s%s %s -> %s", used ? ", " : "", same_keys[i], x, y);
    }
    if (used)
        rc = st_fail(ST_ECONFIG, "checkpoint %s belongs to another run: %s (checkpoint -> this job); restore the old "
                     "value%s to resume, or %s", path, diff, strchr(diff, ',') ? "s" : "", HOW_TO_PROCEED);
    st_json_free(old);
    st_json_free(now);
    return rc;
}

int st_trainer_check_model(const trainer *t, const st_ckpt_info *info, const char *path) {
    st_json *old = NULL, *now = NULL;
    int rc = 0;
    if (parse(info->model_config, &old) == 0 && parse(t->model_config_text, &now) == 0 && old->type == ST_JSON_OBJECT) {
        /* keys of either side: a key only one of them has is a difference too */
        for (int side = 0; !rc && side < 2; side++) {
            const st_json *a = side ? now : old, *b = side ? old : now;
            for (size_t i = 0; !rc && a->type == ST_JSON_OBJECT && i < a->count; i++) {
                const char *k = a->keys[i];
                if (incidental_key(k) || json_same(a->items[i], st_json_get(b, k))) continue;
                char x[200], y[200];
                json_text(side ? st_json_get(old, k) : a->items[i], x, sizeof x);
                json_text(side ? a->items[i] : st_json_get(now, k), y, sizeof y);
                rc = st_fail(ST_ECONFIG, "checkpoint %s is of another model: config.json %s is %s there, %s in %s; "
                             "point model.path at the model it was trained from, or %s", path, k, x, y,
                             t->cfg->model.path, HOW_TO_PROCEED);
            }
        }
    }
    st_json_free(old);
    st_json_free(now);
    if (!rc && info->base_checksum && t->base_checksum && info->base_checksum != t->base_checksum)
        rc = st_fail(ST_ECONFIG, "checkpoint %s was trained from another base model: the weights in %s (checksum "
                     "%016llx) are not the ones it started from (%016llx), although the shapes agree; point model.path "
                     "at the original model, or %s", path, t->cfg->model.path, (unsigned long long)t->base_checksum,
                     (unsigned long long)info->base_checksum, HOW_TO_PROCEED);
    return rc;
}

int st_trainer_check_compat(const trainer *t, const st_ckpt_info *info, const char *path) {
    const st_config *c = t->cfg;
    int rc = check_job(t, info, path);
    if (!rc && info->step > c->train.steps)
        rc = st_fail(ST_ECONFIG, "checkpoint %s is at step %lld, beyond train.steps %lld: raise train.steps to continue "
                     "it, or %s", path, (long long)info->step, (long long)c->train.steps, HOW_TO_PROCEED);
    return rc;
}

int st_trainer_range_checksum(const trainer *t, size_t first, size_t n, uint64_t *out) {
    const st_model *m = &t->model;
    const size_t chunk = 1u << 20;
    float *host = malloc(chunk * sizeof(float));
    if (!host) return -1;
    uint64_t sum = 0;
    for (size_t at = first; at < first + n; at += chunk) {
        size_t k = first + n - at < chunk ? first + n - at : chunk;
        t->be->copy_to_host(host, st_model_weight_ptr(m, at), k * sizeof(float)); /* within one parameter */
        sum += st_ckpt_checksum(host, at, k);
    }
    free(host);
    *out += sum;
    return 0;
}

uint64_t st_trainer_weights_checksum(const trainer *t) {
    uint64_t sum = 0;
    if (st_trainer_range_checksum(t, 0, t->model.n_weights, &sum)) return 0; /* not recorded: the check is skipped, never wrong */
    return sum ? sum : 1;
}
