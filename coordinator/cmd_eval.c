/* cmd_eval.c — `shardtune eval --model DIR [--adapter DIR] --data DATA.h5 --seq-len T [--json] [--batch B]`.
 *
 * The contract (DESIGN.md): mean loss per unmasked target token over consecutive windows of T+1
 * tokens, stride T, in order from the file's token stream; a partial last window is dropped.
 * Prints `loss=<float> tokens=<int>` (or one JSON object with --json). --adapter applies a PEFT LoRA adapter
 * directory on top of the base model (checkpoints/peft_dir.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_io.h"
#include "checkpoints/ckpt.h"
#include "checkpoints/peft_dir.h"
#include "common/error.h"
#include "coordinator/commands.h"
#include "kernels/kernels.h"
#include "worker/dataset.h"
#include "worker/model.h"

static int usage(void) {
    fprintf(stderr, "usage: shardtune eval --model DIR [--adapter DIR] --data DATA.h5 --seq-len T [--json] [--batch B]\n");
    return ST_EXIT_USAGE;
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

int st_cmd_eval(int argc, char **argv) {
    const char *model_dir = NULL, *data = NULL, *adapter = NULL;
    int T = 0, B = 8, json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_dir = argv[++i];
        else if (!strcmp(argv[i], "--data") && i + 1 < argc) data = argv[++i];
        else if (!strcmp(argv[i], "--adapter") && i + 1 < argc) adapter = argv[++i];
        else if ((!strcmp(argv[i], "--seq-len") || !strcmp(argv[i], "--batch")) && i + 1 < argc) {
            int64_t v;
            int seq = !strcmp(argv[i], "--seq-len");
            int rc = st_cli_int("eval", argv[i], argv[i + 1], 1, seq ? 1 << 22 : 1 << 16, &v);
            if (rc) return rc;
            i++;
            if (seq) T = (int)v;
            else B = (int)v;
        }
        else if (!strcmp(argv[i], "--json")) json = 1;
        else return usage();
    }
    if (!model_dir || !data || T < 1 || B < 1) return usage();
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
