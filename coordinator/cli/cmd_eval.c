/* cmd_eval.c — `shardtune eval --model DIR [--adapter DIR] --data DATA.h5 --seq-len T [--json] [--batch B]`
 * and `shardtune eval --split train|val|test --job JOB.yaml [--model DIR] [--adapter DIR] [--json] [--batch B]
 * [key=value ...]`.
 *
 * The contract (DESIGN.md): mean loss per unmasked target token over consecutive windows of T+1
 * tokens, stride T, in order from the file's token stream; a partial last window is dropped.
 * Prints `loss=<float> tokens=<int>` (or one JSON object with --json). --adapter applies a PEFT LoRA adapter
 * directory on top of the base model (checkpoints/peft_dir.h).
 *
 * With --job the data is the job's own split of each of its tasks, opened by the trainer's data plan
 * (coordinator/trainer/data_plan.h: the same by-document split, seq_len and packing), evaluated as the
 * trainer's periodic eval does (st_loader_eval_*, whole split, every window); one line per task, then
 * the token-weighted overall loss. The model defaults to the job's model.path.
 *
 * Under mpirun / srun, rank 0 evaluates and prints; the other ranks exit 0 at once, so N ranks print
 * exactly what one does (once), never the same job N times. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_io.h"
#include "checkpoints/ckpt.h"
#include "checkpoints/peft_dir.h"
#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "kernels/kernels.h"
#include "coordinator/config/config.h"
#include "coordinator/config/slurm_env.h"
#include "coordinator/trainer/data_plan.h"
#include "worker/dataset.h"
#include "worker/model.h"

static int usage(void) {
    fprintf(stderr, "usage: shardtune eval --model DIR [--adapter DIR] --data DATA.h5 --seq-len T [--json] [--batch B]\n"
                    "       shardtune eval --split train|val|test --job JOB.yaml [--model DIR] [--adapter DIR] [--json] "
                    "[--batch B] [key=value ...]\n");
    return ST_EXIT_USAGE;
}

static int usage_line(const char *msg) {
    fprintf(stderr, "shardtune eval: error: %s\n", msg);
    return usage();
}

/* Sums loss and target counts over all windows; the model is sized for B windows per forward. */
static int eval_windows(st_model *m, const st_dataset *d, int T, double *loss_sum, double *targets) {
    int B = m->B;
    uint64_t n_windows = d->n_tokens > (uint64_t)T ? (d->n_tokens - 1) / (uint64_t)T : 0;
    size_t n = (size_t)B * T;
    int32_t *in = malloc(n * sizeof *in), *tg = malloc(n * sizeof *tg);
    float *w = malloc(n * sizeof *w);
    if (!in || !tg || !w) { free(in); free(tg); free(w); return st_fail(ST_ENOMEM, "out of memory"); }
    *loss_sum = 0;
    *targets = 0;
    for (uint64_t w0 = 0; w0 < n_windows; w0 += (uint64_t)B) {
        int rows = (int)(n_windows - w0 < (uint64_t)B ? n_windows - w0 : (uint64_t)B);
        for (int r = 0; r < B; r++) {
            for (int j = 0; j < T; j++) {
                size_t i = (size_t)r * T + j;
                if (r >= rows) { in[i] = 0; tg[i] = 0; w[i] = 0; continue; }
                uint64_t pos = (w0 + (uint64_t)r) * (uint64_t)T + (uint64_t)j;
                in[i] = (int32_t)d->tokens[pos];
                tg[i] = (int32_t)d->tokens[pos + 1];
                w[i] = d->loss_mask[pos + 1] ? 1.0f : 0.0f;
            }
        }
        st_model_forward(m, in, tg, w, 0);
        for (size_t i = 0; i < n; i++) {
            *loss_sum += (double)w[i] * m->loss_per_pos[i];
            *targets += w[i];
        }
    }
    free(in); free(tg); free(w);
    return 0;
}

/* ---------------- --split --job: the job's own split ---------------- */

static const char *const split_names[] = {"train", "val", "test"};

/* Loss sum and target count of task k's split, B windows per forward, as st_trainer_eval_task does. */
static int eval_split(st_model *m, const st_loader *L, int k, int split, int32_t *in, int32_t *tg, float *w,
                      int32_t *pos, double *loss_sum, double *targets) {
    st_loader_eval it;
    int rc = st_loader_eval_begin(L, k, split, &it), B = m->B, T = L->seq_len;
    *loss_sum = 0, *targets = 0;
    while (rc == 0) {
        int rows = 0;
        for (; rows < B; rows++) {
            size_t o = (size_t)rows * T;
            if (!st_loader_eval_next_docs(&it, in + o, tg + o, w + o, NULL, pos ? pos + o : NULL)) break;
        }
        if (rows == 0) break;
        for (int i = rows * T; i < B * T; i++) { in[i] = 0; tg[i] = 0; w[i] = 0; }
        for (int i = rows * T; i < B * T && pos; i++) pos[i] = i % T;
        if (pos && (rc = st_model_set_doc_positions(m, pos))) break;
        st_model_forward(m, in, tg, w, 0);
        for (int i = 0; i < B * T; i++) {
            *loss_sum += (double)w[i] * m->loss_per_pos[i];
            *targets += w[i];
        }
    }
    return rc;
}

static void print_result(const char *task, int split, double loss, double targets, uint64_t docs, int json, int last) {
    if (json) {
        printf("%s\"", task ? "" : "}, ");
        if (task) printf("%s", task); /* names are letters, digits, '_', '-', '.' (config.c) */
        else printf("split\": \"%s\", \"loss", split_names[split]);
        printf(task ? "\": {\"loss\": " : "\": ");
        if (targets > 0) printf("%.9g", loss / targets);
        else printf("null");
        printf(", \"tokens\": %.0f", targets);
        if (task) printf(", \"docs\": %llu}%s", (unsigned long long)docs, last ? "" : ", ");
        else printf("}\n");
        return;
    }
    if (task) printf("task=%s split=%s docs=%llu ", task, split_names[split], (unsigned long long)docs);
    if (targets > 0) printf("loss=%.6f tokens=%.0f\n", loss / targets, targets);
    else printf("loss=nan tokens=0\n");
}

/* Evaluates every task of the job on `split`; the model is loaded and (adapter) applied by the caller. */
static int eval_job(st_model *m, const st_config *c, int split, int B, int json) {
    st_dataset *ds = calloc((size_t)c->n_tasks, sizeof *ds);
    st_loader L;
    memset(&L, 0, sizeof L);
    int T = c->train.seq_len, opened = 0, rc = ds ? 0 : st_fail(ST_ENOMEM, "out of memory");
    if (!rc && !(rc = st_data_plan_open(c, m->cfg.vocab, ds, &L))) opened = 1;
    if (!rc) rc = st_model_alloc_activations(m, B, T);
    if (!rc) rc = st_model_set_precision(m, c->precision); /* the trainer's eval arithmetic */
    size_t n = (size_t)B * T;
    int32_t *in = malloc(n * sizeof *in), *tg = malloc(n * sizeof *tg);
    int32_t *pos = c->train.packing == ST_PACKING_DOCUMENTS ? malloc(n * sizeof *pos) : NULL;
    float *w = malloc(n * sizeof *w);
    if (!rc && (!in || !tg || !w || (c->train.packing == ST_PACKING_DOCUMENTS && !pos)))
        rc = st_fail(ST_ENOMEM, "out of memory");
    double *sum = calloc((size_t)c->n_tasks * 2, sizeof *sum);
    if (!rc && !sum) rc = st_fail(ST_ENOMEM, "out of memory");
    double all = 0, all_n = 0;
    for (int k = 0; !rc && k < c->n_tasks; k++) {
        rc = eval_split(m, &L, k, split, in, tg, w, pos, &sum[2 * k], &sum[2 * k + 1]);
        if (!rc && !isfinite(sum[2 * k])) rc = st_fail(ST_EINVAL, "task '%s': the loss is not finite", c->tasks[k].name);
        all += sum[2 * k], all_n += sum[2 * k + 1];
    }
    if (!rc && !(all_n > 0))
        rc = st_fail(ST_EINVAL, "the %s split of the job's tasks holds no target token (split: [%g, %g, %g]; a split needs "
                     "at least one window of train.seq_len + 1 = %d tokens): nothing to evaluate", split_names[split],
                     c->split[0], c->split[1], c->split[2], T + 1);
    if (!rc) {
        if (json) printf("{\"tasks\": {");
        for (int k = 0; k < c->n_tasks; k++)
            print_result(c->tasks[k].name, split, sum[2 * k], sum[2 * k + 1], L.tasks[k].n_docs[split], json,
                         k + 1 == c->n_tasks);
        print_result(NULL, split, all, all_n, 0, json, 1);
    }
    free(in), free(tg), free(w), free(pos), free(sum);
    if (opened) st_loader_free(&L);
    for (int k = 0; ds && k < c->n_tasks; k++) st_dataset_free(&ds[k]);
    free(ds);
    return rc;
}

static int run_job(const char *job, int split, const char *model_dir, const char *adapter, int B, int json,
                   int n_over, char **over) {
    st_config *c = malloc(sizeof *c);
    if (!c) return st_cli_error("eval", "out of memory");
    int rc = st_config_load(c, job, n_over, over);
    if (!rc && c->train.micro_batch > 0 && B <= 0) B = c->train.micro_batch;
    if (!rc && (int64_t)B * c->train.seq_len > (1 << 26))
        rc = st_fail(ST_EINVAL, "--batch %d x train.seq_len %d is over 2^26 tokens per batch", B, c->train.seq_len);
    if (!model_dir && !rc) model_dir = c->model.path;
    st_model m;
    int loaded = 0;
    if (!rc && !(rc = st_model_load_dir(model_dir, st_backend_cpu(0), &m))) loaded = 1;
    if (loaded && st_model_load_warning()) fprintf(stderr, "shardtune eval: warning: %s\n", st_model_load_warning());
    if (!rc) rc = st_model_check_finite(&m, model_dir);
    if (!rc && adapter) rc = st_peft_load_dir(&m, adapter);
    if (!rc) rc = eval_job(&m, c, split, B, json);
    if (loaded) st_model_free(&m);
    free(c);
    return rc ? st_cli_error("eval", st_error()) : ST_EXIT_OK;
}

int st_cmd_eval(int argc, char **argv) {
    st_slurm_env env; /* rank 0 does the whole job (an unreadable launcher environment: as if alone) */
    if (st_slurm_env_read(&env) == 0 && env.rank > 0) return ST_EXIT_OK;
    const char *model_dir = NULL, *data = NULL, *adapter = NULL, *job = NULL, *split_name = NULL;
    int T = 0, B = 0, json = 0, n_over = 0;
    char **over = calloc((size_t)argc, sizeof *over);
    if (!over) return st_cli_error("eval", "out of memory");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_dir = argv[++i];
        else if (!strcmp(argv[i], "--job") && i + 1 < argc) job = argv[++i];
        else if (!strcmp(argv[i], "--split") && i + 1 < argc) split_name = argv[++i];
        else if (argv[i][0] != '-' && strchr(argv[i], '=')) over[n_over++] = argv[i]; /* key=value (with --job) */
        else if (!strcmp(argv[i], "--data") && i + 1 < argc) data = argv[++i];
        else if (!strcmp(argv[i], "--adapter") && i + 1 < argc) adapter = argv[++i];
        else if ((!strcmp(argv[i], "--seq-len") || !strcmp(argv[i], "--batch")) && i + 1 < argc) {
            int64_t v;
            int seq = !strcmp(argv[i], "--seq-len");
            int rc = st_cli_int("eval", argv[i], argv[i + 1], 1, seq ? 1 << 22 : 1 << 16, &v);
            if (rc) { free(over); return rc; }
            i++;
            if (seq) T = (int)v;
            else B = (int)v;
        }
        else if (!strcmp(argv[i], "--json")) json = 1;
        else { free(over); st_cli_bad_arg("eval", argv[i]); return usage(); }
    }
    if (split_name || job) {
        int split = -1, rc;
        for (int s = 0; split_name && s < 3; s++)
            if (!strcmp(split_name, split_names[s])) split = s;
        if (!job) rc = usage_line("--split needs --job JOB.yaml (the split is the job's own: its tasks, split, seed, "
                                  "train.seq_len and train.packing)");
        else if (!split_name) rc = usage_line("--job needs --split train|val|test");
        else if (split < 0) rc = usage_line("--split must be train, val or test");
        else if (data || T) rc = usage_line("--data and --seq-len come from the job with --job (its tasks and "
                                            "train.seq_len; override as train.seq_len=N)");
        else rc = run_job(job, split, model_dir, adapter, B, json, n_over, over);
        free(over);
        return rc;
    }
    free(over);
    if (n_over) return usage_line("key=value overrides go with --job JOB.yaml");
    if (!B) B = 8;
    if (!model_dir || !data || T < 1) {
        st_cli_missing("eval", !model_dir ? "--model DIR" : !data ? "--data DATA.h5" : "--seq-len T");
        return usage();
    }
    if ((int64_t)B * T > (1 << 26)) return st_cli_error("eval", "--batch x --seq-len is over 2^26 tokens per batch");
    st_model m;
    st_dataset d;
    memset(&d, 0, sizeof d);
    int rc = st_model_load_dir(model_dir, st_backend_cpu(0), &m);
    if (rc) return st_cli_error("eval", st_error());
    if (st_model_load_warning()) fprintf(stderr, "shardtune eval: warning: %s\n", st_model_load_warning());
    if ((rc = st_model_check_finite(&m, model_dir)) || (adapter && (rc = st_peft_load_dir(&m, adapter)))) {
        st_model_free(&m);
        return st_cli_error("eval", st_error());
    }
    rc = st_dataset_load(data, &d);
    for (uint64_t i = 0; !rc && i < d.n_tokens; i++)
        if ((int64_t)d.tokens[i] >= m.cfg.vocab)
            rc = st_fail(ST_EINVAL, "%s: token %u at index %llu is outside the model's vocabulary (%d)", data,
                         d.tokens[i], (unsigned long long)i, m.cfg.vocab);
    if (!rc && d.n_tokens < (uint64_t)T + 1)
        rc = st_fail(ST_EINVAL, "%s: %llu tokens is fewer than one window of seq-len + 1 = %d", data,
                     (unsigned long long)d.n_tokens, T + 1);
    if (!rc) rc = st_model_alloc_activations(&m, B, T);
    double loss = 0, targets = 0;
    if (!rc) rc = eval_windows(&m, &d, T, &loss, &targets);
    st_dataset_free(&d);
    st_model_free(&m);
    if (rc) return st_cli_error("eval", st_error());
    if (!(targets > 0)) return st_cli_error("eval", "no unmasked target token in any window (loss_mask all 0?): nothing to evaluate");
    if (!isfinite(loss)) return st_cli_error("eval", "the loss is not finite");
    double mean = loss / targets;
    if (json) printf("{\"loss\": %.9g, \"tokens\": %.0f}\n", mean, targets);
    else printf("loss=%.6f tokens=%.0f\n", mean, targets);
    return ST_EXIT_OK;
}
