/* gen_run.c — what `generate` and `compare` share (gen_run.h): prompt files, generation flags, and the
 * multi-rank runner (whole batches per rank, answers gathered on rank 0 in input order). No printing. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "checkpoints/peft_dir.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/generate/gen_run.h"
#include "coordinator/generate/gen_text.h"
#include "worker/comm.h"
#include "worker/lora.h"

/* ---------------- prompts ---------------- */

void st_prompts_free(st_prompt_set *ps) {
    for (int i = 0; i < ps->n; i++) {
        free(ps->p[i].line);
        free(ps->p[i].id);
        free(ps->p[i].ids);
    }
    free(ps->p);
    ps->p = NULL;
    ps->n = 0;
}

static char *dup_range(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) { memcpy(d, s, n); d[n] = 0; }
    return d;
}

int st_jsonl_next(char **cursor, const char *end, long *ln, char **line, size_t *len) {
    while (*cursor < end) {
        char *s = *cursor, *e = memchr(s, '\n', (size_t)(end - s));
        if (!e) e = (char *)end;
        *cursor = e + 1;
        (*ln)++;
        while (s < e && (*s == ' ' || *s == '\t' || *s == '\r')) s++;
        while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) e--;
        if (e == s) continue;
        *line = s;
        *len = (size_t)(e - s);
        return 1;
    }
    return 0;
}

int st_json_id_text(const st_json *id, char *buf, size_t size) {
    if (id && id->type == ST_JSON_STRING) snprintf(buf, size, "%s", id->string);
    else if (id && id->type == ST_JSON_NUMBER && id->is_integer) snprintf(buf, size, "%lld", (long long)id->integer);
    else return -1;
    return 0;
}

/* One line's object into prompt p (line number `ln`, 1-based in messages, 0-based as the default id). */
static int parse_prompt(const char *path, long ln, const char *text, size_t len, st_prompt *p) {
    st_json *v = NULL;
    int rc = st_json_parse(text, len, &v);
    if (rc) return st_fail_context(rc, "%s line %ld", path, ln + 1);
    if (v->type != ST_JSON_OBJECT) {
        st_json_free(v);
        return st_fail(ST_EFORMAT, "%s line %ld: a prompt line must be a JSON object", path, ln + 1);
    }
    const st_json *ids = st_json_get(v, "input_ids"), *id = st_json_get(v, "id");
    char idbuf[256];
    if (!id) snprintf(idbuf, sizeof idbuf, "%ld", ln);
    else if (id->type == ST_JSON_STRING) p->id = strdup(id->string);
    else if (st_json_id_text(id, idbuf, sizeof idbuf))
        rc = st_fail(ST_EFORMAT, "%s line %ld: \"id\" must be a string or an integer", path, ln + 1);
    if (!rc && !p->id) p->id = strdup(idbuf);
    const st_json *prompt = st_json_get(v, "prompt"), *msgs = st_json_get(v, "messages");
    p->line_no = ln + 1;
    if (!rc && !ids && (prompt || msgs)) {
        p->is_text = 1;
        if (prompt ? prompt->type != ST_JSON_STRING : msgs->type != ST_JSON_ARRAY)
            rc = st_fail(ST_EFORMAT, "%s line %ld: \"prompt\" must be a string, \"messages\" an array", path, ln + 1);
    } else if (!rc && (!ids || ids->type != ST_JSON_ARRAY || ids->count == 0))
        rc = st_fail(ST_EFORMAT, "%s line %ld: needs \"input_ids\", a non-empty array of token ids", path, ln + 1);
    if (!rc && !p->is_text) {
        p->n_ids = (int)ids->count;
        p->ids = malloc(ids->count * sizeof(int32_t));
        if (!p->ids) rc = st_fail(ST_ENOMEM, "out of memory reading %s", path);
        for (size_t k = 0; !rc && k < ids->count; k++) {
            const st_json *e = ids->items[k];
            if (e->type != ST_JSON_NUMBER || !e->is_integer || e->integer < 0 || e->integer > INT32_MAX)
                rc = st_fail(ST_EFORMAT, "%s line %ld: input_ids[%zu] is not a token id", path, ln + 1, k);
            else p->ids[k] = (int32_t)e->integer;
        }
    }
    if (!rc) {
        p->line = dup_range(text, len);
        if (!p->line || !p->id) rc = st_fail(ST_ENOMEM, "out of memory reading %s", path);
    }
    st_json_free(v);
    return rc;
}

int st_prompts_read(const char *path, st_prompt_set *ps) {
    memset(ps, 0, sizeof *ps);
    char *data = NULL;
    size_t len = 0;
    int rc = st_read_file(path, &data, &len);
    if (rc) return rc;
    int cap = 0;
    long ln = -1;
    char *cur = data, *line = NULL;
    size_t n = 0;
    while (!rc && st_jsonl_next(&cur, data + len, &ln, &line, &n)) {
        if (ps->n == cap) {
            cap = cap ? 2 * cap : 64;
            st_prompt *np = realloc(ps->p, (size_t)cap * sizeof *np);
            if (!np) { rc = st_fail(ST_ENOMEM, "out of memory reading %s", path); break; }
            ps->p = np;
        }
        memset(&ps->p[ps->n], 0, sizeof ps->p[0]);
        rc = parse_prompt(path, ln, line, n, &ps->p[ps->n]);
        ps->n++;
    }
    free(data);
    if (!rc && ps->n == 0) rc = st_fail(ST_EINVAL, "%s holds no prompts", path);
    if (rc) st_prompts_free(ps);
    return rc;
}

/* ---------------- flags ---------------- */

void st_gen_flags_default(st_gen_flags *f) {
    memset(f, 0, sizeof *f);
    f->gp.max_new = 128;
    f->gp.temperature = 0.0f;
    f->gp.top_p = 1.0f;
    f->gp.repetition_penalty = 1.0f;
    f->gp.seed = 1234;
    f->gp.batch = 8;
    snprintf(f->backend, sizeof f->backend, "auto");
}

static int num_arg(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return st_fail(ST_EINVAL, "%s '%s' is not a number in [%g, %g]", flag, s, lo, hi);
    *out = v;
    return 0;
}

int st_gen_flags_parse(st_gen_flags *f, int argc, char **argv, int *i) {
    static const char *names[] = {"--max-new", "--temperature", "--top-p", "--top-k", "--seed",
                                  "--repetition-penalty", "--batch", "--backend"};
    const char *a = argv[*i];
    if (!strcmp(a, "--timing")) return f->timing = 1;
    if (!strcmp(a, "--chat")) return f->chat = 1;
    if (!strcmp(a, "--stop")) {
        if (*i + 1 >= argc || !argv[*i + 1][0]) return st_fail(ST_EINVAL, "--stop needs a non-empty string");
        if (f->n_stop == ST_GEN_MAX_STOP) return st_fail(ST_EINVAL, "at most %d --stop strings", ST_GEN_MAX_STOP);
        f->stop[f->n_stop++] = argv[++*i];
        return 1;
    }
    int which = -1;
    for (int k = 0; k < (int)(sizeof names / sizeof names[0]); k++)
        if (!strcmp(a, names[k])) which = k;
    if (which < 0) return 0;
    if (*i + 1 >= argc) return st_fail(ST_EINVAL, "%s needs a value", a);
    const char *s = argv[++*i];
    double v = 0;
    int rc = 0;
    switch (which) {
    case 0: if (!(rc = num_arg(a, s, 1, 1e7, &v))) f->gp.max_new = (int)v; break;
    case 1: if (!(rc = num_arg(a, s, 0, 1e6, &v))) f->gp.temperature = (float)v; break;
    case 2: if (!(rc = num_arg(a, s, 1e-9, 1, &v))) f->gp.top_p = (float)v; break;
    case 3: if (!(rc = num_arg(a, s, 0, 1e9, &v))) f->gp.top_k = (int)v; break;
    case 4: if (!(rc = num_arg(a, s, 0, 1.8e19, &v))) f->gp.seed = strtoull(s, NULL, 10); break;
    case 5: if (!(rc = num_arg(a, s, 1e-6, 1e6, &v))) f->gp.repetition_penalty = (float)v; break;
    case 6: if (!(rc = num_arg(a, s, 1, 4096, &v))) f->gp.batch = (int)v; break;
    default:
        if (strcmp(s, "auto") && strcmp(s, "cpu") && strcmp(s, "cuda"))
            return st_fail(ST_EINVAL, "--backend '%s' is not auto, cpu or cuda", s);
        snprintf(f->backend, sizeof f->backend, "%s", s);
    }
    if (!rc && (which == 0 || which == 3 || which == 6) && v != floor(v))
        rc = st_fail(ST_EINVAL, "%s '%s' is not an integer", a, s);
    return rc ? rc : 1;
}

const char *st_gen_finish_name(st_gen_finish f) {
    switch (f) {
    case ST_GEN_EOS: return "eos";
    case ST_GEN_STOP: return "stop";
    case ST_GEN_MAXPOS: return "max_positions";
    default: return "length";
    }
}

/* ---------------- end tokens ---------------- */

/* generation_config.json's eos_token_id (a number or a list) when the file has one, else config.json's. */
static int read_eos(const char *dir, const st_model *m, int32_t *eos, int cap, int *n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    *n = 0;
    FILE *probe = fopen(path, "rb");
    if (probe) {
        fclose(probe);
        char *text = NULL;
        size_t len = 0;
        st_json *v = NULL;
        int rc = st_read_file(path, &text, &len);
        if (!rc) rc = st_json_parse(text, len, &v);
        free(text);
        if (rc) return st_fail_context(rc, "%s", path);
        const st_json *e = st_json_get(v, "eos_token_id");
        if (e && e->type == ST_JSON_NUMBER && e->is_integer) {
            eos[(*n)++] = (int32_t)e->integer;
        } else if (e && e->type == ST_JSON_ARRAY) {
            for (size_t k = 0; k < e->count && *n < cap; k++) {
                if (e->items[k]->type != ST_JSON_NUMBER || !e->items[k]->is_integer) { rc = ST_EFORMAT; break; }
                eos[(*n)++] = (int32_t)e->items[k]->integer;
            }
        } else if (e && e->type != ST_JSON_NULL) {
            rc = ST_EFORMAT;
        }
        st_json_free(v);
        if (rc) return st_fail(rc, "%s: eos_token_id must be a token id or a list of them", path);
        if (e) return 0;
    }
    if (m->cfg.eos_id >= 0) eos[(*n)++] = m->cfg.eos_id;
    return 0;
}

/* ---------------- running on the ranks ---------------- */

static int pick_backend(const st_gen_flags *f, MPI_Comm comm, const st_backend **be) {
    if ((*be = st_backend_override())) return 0; /* a test's backend (kernels.h: tests/tools/fakedev.c) */
    if (strcmp(f->backend, "cpu") != 0) {
        int local = 0, local_size = 1;
        int rc = st_comm_node_rank(comm, &local, &local_size);
        if (rc) return rc;
        *be = st_backend_cuda_for_rank(local, local_size);
        if (*be) return 0;
        if (!strcmp(f->backend, "cuda")) return st_fail(ST_EDEVICE, "--backend cuda requested but %s", st_error());
    }
    *be = st_backend_cpu(0);
    return 0;
}

/* This rank's prompts in order: batches k = rank, rank + P, ... of `batch` prompts each. */
static int my_prompts(int n, int batch, int rank, int world, int *idx) {
    int count = 0;
    for (int k = rank; (long)k * batch < n; k += world)
        for (int i = k * batch; i < n && i < (k + 1) * batch; i++) idx[count++] = i;
    return count;
}

/* Agrees on a status across ranks: the lowest failing rank keeps its message and is the one to print. */
static int agree(MPI_Comm comm, int rc, int *print_error) {
    int rank, world, first;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    int mine = rc ? rank : world;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == world) return 0;
    *print_error = first == rank;
    return rc ? rc : ST_ECOMM;
}

/* Packs this rank's answers as int32 words: per prompt [n, finish, ids...]. */
static int32_t *pack_answers(const st_gen_seq *s, int count, int *words) {
    int w = 0;
    for (int i = 0; i < count; i++) w += 2 + s[i].n_out;
    int32_t *buf = malloc((size_t)(w ? w : 1) * sizeof *buf);
    if (!buf) return NULL;
    int o = 0;
    for (int i = 0; i < count; i++) {
        buf[o++] = s[i].n_out;
        buf[o++] = (int32_t)s[i].finish;
        memcpy(buf + o, s[i].out, (size_t)s[i].n_out * sizeof(int32_t));
        o += s[i].n_out;
    }
    *words = w;
    return buf;
}

/* Rank 0: rebuilds input order from every rank's packed answers. */
static int unpack_answers(const int32_t *all, const int *displs, int world, int n, int batch, st_answer *ans) {
    int *idx = malloc((size_t)n * sizeof *idx);
    if (!idx) return st_fail(ST_ENOMEM, "out of memory gathering answers");
    for (int r = 0; r < world; r++) {
        int count = my_prompts(n, batch, r, world, idx);
        const int32_t *p = all + displs[r];
        for (int k = 0; k < count; k++) {
            st_answer *a = &ans[idx[k]];
            a->n = p[0];
            a->finish = (st_gen_finish)p[1];
            a->ids = malloc((size_t)(a->n ? a->n : 1) * sizeof(int32_t));
            if (!a->ids) { free(idx); return st_fail(ST_ENOMEM, "out of memory gathering answers"); }
            memcpy(a->ids, p + 2, (size_t)a->n * sizeof(int32_t));
            p += 2 + a->n;
        }
    }
    free(idx);
    return 0;
}

void st_answers_free(st_answer *a, int n) {
    if (!a) return;
    for (int i = 0; i < n; i++) {
        free(a[i].ids);
        free(a[i].text);
    }
    free(a);
}

/* ---------------- text ---------------- */

/* Per run: the tokenizer (NULL when the model has none) and the ids of text prompts. */
typedef struct {
    st_gen_text *tok;
    int32_t **enc; /* [n]: encoded ids of text prompts (NULL for input_ids lines) */
    int *n_enc;
    const st_gen_flags *f;
} run_text;

static void run_text_free(run_text *t, int n) {
    for (int i = 0; t->enc && i < n; i++) free(t->enc[i]);
    free(t->enc);
    free(t->n_enc);
    st_gen_text_free(t->tok);
}

/* Opens the model's tokenizer and encodes this rank's text prompts (idx[0..count)). */
static int run_text_open(run_text *t, const char *dir, const st_prompt_set *ps, const int *idx, int count,
                         const st_gen_flags *f) {
    memset(t, 0, sizeof *t);
    t->f = f;
    int need = f->n_stop > 0 || f->chat;
    for (int i = 0; i < ps->n; i++) need |= ps->p[i].is_text;
    int rc = st_gen_text_open(dir, &t->tok);
    if (rc) return rc;
    if (!t->tok && need)
        return st_fail(ST_EINVAL, "%s has no tokenizer.json: text prompts, --chat and --stop need one (give "
                                  "\"input_ids\")", dir);
    t->enc = calloc((size_t)ps->n + 1, sizeof *t->enc);
    t->n_enc = calloc((size_t)ps->n + 1, sizeof *t->n_enc);
    if (!t->enc || !t->n_enc) return st_fail(ST_ENOMEM, "out of memory");
    for (int k = 0; k < count; k++) {
        const st_prompt *p = &ps->p[idx[k]];
        if (!p->is_text) continue;
        rc = st_gen_text_encode(t->tok, p->line, f->chat, &t->enc[idx[k]], &t->n_enc[idx[k]]);
        if (rc) return st_fail_context(rc, "prompt line %ld", p->line_no);
    }
    return 0;
}

/* The stop callback: the answer's text so far holds one of the --stop strings. */
typedef struct {
    const run_text *t;
} stop_ctx;

static int stop_check(void *ctx, int seq, const int32_t *out, int n_out) {
    (void)seq;
    const run_text *t = ((stop_ctx *)ctx)->t;
    char *text = NULL;
    if (st_gen_text_decode(t->tok, out, n_out, &text)) return 0;
    int hit = 0;
    for (int i = 0; i < t->f->n_stop && !hit; i++) hit = strstr(text, t->f->stop[i]) != NULL;
    free(text);
    return hit;
}

static int gather_answers(MPI_Comm comm, const st_gen_seq *s, int count, int n, int batch, st_answer **answers) {
    int rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    int words = 0, rc = 0;
    int32_t *mine = pack_answers(s, count, &words);
    int ok = mine != NULL, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm);
    if (!all_ok) { free(mine); return st_fail(ST_ENOMEM, "out of memory packing answers"); }
    int *counts = rank == 0 ? calloc((size_t)world, sizeof(int)) : NULL;
    int *displs = rank == 0 ? calloc((size_t)world + 1, sizeof(int)) : NULL;
    MPI_Gather(&words, 1, MPI_INT, counts, 1, MPI_INT, 0, comm);
    int32_t *all = NULL;
    if (rank == 0) {
        for (int r = 0; r < world; r++) displs[r + 1] = displs[r] + counts[r];
        all = malloc((size_t)(displs[world] ? displs[world] : 1) * sizeof *all);
    }
    MPI_Gatherv(mine, words, MPI_INT32_T, all, counts, displs, MPI_INT32_T, 0, comm);
    if (rank == 0) {
        *answers = calloc((size_t)n, sizeof **answers);
        rc = *answers ? unpack_answers(all, displs, world, n, batch, *answers) : st_fail(ST_ENOMEM, "out of memory");
    }
    free(mine);
    free(all);
    free(counts);
    free(displs);
    return rc;
}

/* Loading a model for generation without an adapter: the matmul units the files hold in BF16 go straight into
 * the bf16 hold (worker/generate.h st_gen_hold_load: their fp32 pages are never touched, on a device never
 * allocated, so the load never holds the fp32 model), the rest is read as fp32 and checked as before;
 * st_gen_hold_bf16 then holds what else is exact. */
typedef struct {
    st_safetensors *s;
    const st_model *m;
    const char *dir;
    float *buf; /* a widened piece: the finite check */
} held_load;

static int held_can16(void *ctx, int i) {
    const held_load *l = ctx;
    const st_param *p = &l->m->params[i];
    return st_model_param_dtype(l->s, l->m, i) == ST_DTYPE_BF16 && !(p->ndim == 2 && p->transpose_io);
}

static int held_read16(void *ctx, int i, size_t a0, size_t n0, uint16_t *dst) {
    held_load *l = ctx;
    const st_param *p = &l->m->params[i];
    const size_t chunk = (size_t)1 << 16;
    int rc = 0;
    for (size_t a = a0; !rc && a < a0 + n0; a += chunk) {
        size_t n = a0 + n0 - a < chunk ? a0 + n0 - a : chunk;
        uint16_t *d = dst + (a - a0);
        rc = st_model_read_param_bf16_range(l->s, l->m, i, a, n, d);
        for (size_t k = 0; !rc && k < n; k++) l->buf[k] = st_bf16_to_f32(d[k]);
        if (!rc) rc = st_check_finite_values(l->buf, n, a, l->dir, p->name); /* NaN weights: refused, as eval does */
    }
    return rc;
}

/* The parameters st_gen_hold_load did not read (ctx: the hold). */
static void keep_unheld(void *ctx, const st_model *m, int i, size_t *a, size_t *b) {
    const st_gen_hold *h = ctx;
    (void)m;
    if (h->held && h->held[i]) *a = *b = 0;
}

static int load_held(const char *dir, const st_backend *be, st_model *m, st_gen_hold *hold) {
    /* a device model is bound without weights: st_gen_hold_load allocates them once it knows what it holds */
    int rc = be->host_memory ? st_model_open_dir(dir, be, m) : st_model_open_registry(dir, m);
    if (!rc && !be->host_memory && (rc = st_model_bind(m, be, 0))) {
        st_model_free(m);
        rc = st_fail_context(rc, "%s/config.json", dir);
    }
    if (rc) return rc;
    held_load l = {.m = m, .dir = dir, .buf = malloc(((size_t)1 << 16) * sizeof(float))};
    if (!l.buf) rc = st_fail(ST_ENOMEM, "out of memory loading %s", dir);
    if (!rc) rc = st_model_check_files(m, dir, &l.s);
    st_gen_hold_source src = {held_can16, held_read16, &l};
    if (!rc) rc = st_gen_hold_load(m, hold, &src);
    if (l.s) st_safetensors_close(l.s);
    free(l.buf);
    if (!rc) rc = st_model_load_weights_part(m, dir, keep_unheld, hold);
    if (!rc) rc = st_model_check_finite_part(m, dir, keep_unheld, hold);
    return rc;
}

int st_gen_run(const char *model_dir, const st_gen_flags *f, const st_prompt_set *ps, MPI_Comm comm,
               st_answer **answers, float **dump, int *vocab, int *print_error) {
    *answers = NULL;
    *print_error = 0;
    const st_backend *be = NULL;
    st_model m;
    memset(&m, 0, sizeof m);
    int loaded = 0;
    st_gen_hold hold;
    memset(&hold, 0, sizeof hold);
    int rc = pick_backend(f, comm, &be);
    /* without an adapter the BF16 matmul units are read straight into the hold (load_held) */
    if (!rc) rc = f->adapter ? st_model_load_dir(model_dir, be, &m) : load_held(model_dir, be, &m, &hold);
    if (m.be) loaded = 1; /* load_held may fail after the model is built */
    if (!rc && f->adapter) rc = st_model_check_finite(&m, model_dir); /* NaN weights: refused naming the tensor, as eval does */
    /* a LoRA adapter is folded into the weights: the decode path then runs the merged model unchanged; a
     * prompt-learning adapter stays attached (generation prepends its virtual tokens, worker/generate.c) */
    if (!rc && f->adapter && !(rc = st_peft_load_dir(&m, f->adapter)) && !m.prompt) rc = st_lora_merge(&m);
    /* the model is for generation only: matmul weights that are bf16 values are held as bf16 (half the bytes
     * each decode step reads, the same logits; worker/generate.h) */
    if (!rc) rc = st_gen_hold_bf16(&m, &hold);
    rc = agree(comm, rc, print_error);
    st_gen_flags fh = *f;
    fh.gp.hold = &hold;
    if (!rc) rc = st_gen_run_model(&m, model_dir, &fh, ps, comm, answers, dump, vocab, print_error);
    /* a device kernel's failure (kernels.h status) leaves garbage logits: reported, never written out */
    if (!rc) rc = agree(comm, be->status(), print_error);
    st_gen_hold_free(&hold);
    if (loaded) st_model_free(&m);
    return rc;
}

int st_gen_run_model(const st_model *mp, const char *model_dir, const st_gen_flags *f, const st_prompt_set *ps,
                     MPI_Comm comm, st_answer **answers, float **dump, int *vocab, int *print_error) {
    int rank, world;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    *answers = NULL;
    *print_error = 0;
    st_gen_flags fl = *f;
    const st_model m = *mp; /* read only (a shallow copy, so the code below keeps its `m.` spelling) */
    int32_t eos[64];
    int n_eos = 0;
    int rc = read_eos(model_dir, &m, eos, 64, &n_eos);
    int *idx = NULL, count = 0;
    st_gen_seq *seqs = NULL;
    run_text txt;
    memset(&txt, 0, sizeof txt);
    if (!rc) {
        idx = malloc((size_t)ps->n * sizeof *idx);
        seqs = calloc((size_t)ps->n, sizeof *seqs);
        if (!idx || !seqs) rc = st_fail(ST_ENOMEM, "out of memory");
    }
    if (!rc) count = my_prompts(ps->n, fl.gp.batch, rank, world, idx);
    if (!rc) rc = run_text_open(&txt, model_dir, ps, idx, count, f);
    if (!rc && n_eos == 0 && txt.tok && st_gen_text_eos(txt.tok) >= 0) eos[n_eos++] = st_gen_text_eos(txt.tok);
    fl.gp.eos = eos;
    fl.gp.n_eos = n_eos;
    stop_ctx sctx = {&txt};
    if (f->n_stop > 0) {
        fl.gp.stop = stop_check;
        fl.gp.stop_ctx = &sctx;
    }
    if (!rc) rc = st_gen_params_check(&fl.gp, &m);
    rc = agree(comm, rc, print_error);
    if (!rc) {
        size_t dump_floats = 0;
        for (int k = 0; k < count; k++) {
            const st_prompt *p = &ps->p[idx[k]];
            seqs[k].prompt = p->is_text ? txt.enc[idx[k]] : p->ids;
            seqs[k].prompt_len = p->is_text ? txt.n_enc[idx[k]] : p->n_ids;
            seqs[k].stream = (uint64_t)idx[k];
            dump_floats += (size_t)fl.gp.max_new * m.cfg.vocab;
        }
        if (dump) {
            *dump = malloc(dump_floats * sizeof(float) + 1);
            *vocab = m.cfg.vocab;
            if (!*dump) rc = st_fail(ST_ENOMEM, "out of memory for --dump-logits");
            for (int k = 0; !rc && k < count; k++) seqs[k].logits = *dump + (size_t)k * fl.gp.max_new * m.cfg.vocab;
        }
        fl.gp.stats = f->stats;
        if (!rc) rc = st_generate(&m, &fl.gp, seqs, count);
        if (rc && world > 1) st_fail_context(rc, "rank %d", rank);
    }
    rc = agree(comm, rc, print_error);
    if (!rc) rc = agree(comm, gather_answers(comm, seqs, count, ps->n, fl.gp.batch, answers), print_error);
    for (int i = 0; !rc && rank == 0 && txt.tok && i < ps->n; i++) { /* the answers as text */
        rc = st_gen_text_decode(txt.tok, (*answers)[i].ids, (*answers)[i].n, &(*answers)[i].text);
        if (rc) *print_error = 1;
    }
    if (dump && !rc) { /* compact: drop the unused rows after each prompt's last token */
        size_t o = 0;
        for (int k = 0; k < count; k++) {
            size_t row = (size_t)m.cfg.vocab;
            memmove(*dump + o, seqs[k].logits, (size_t)seqs[k].n_out * row * sizeof(float));
            o += (size_t)seqs[k].n_out * row;
        }
    }
    for (int k = 0; seqs && k < count; k++) free(seqs[k].out);
    free(seqs);
    free(idx);
    run_text_free(&txt, ps->n);
    return rc;
}

