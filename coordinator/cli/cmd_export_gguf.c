/* cmd_export_gguf.c — `shardtune export SRC --out FILE.gguf --format gguf [--quant T]`: a checkpoint or HF
 * model directory as one GGUF file that llama.cpp runs (checkpoints/gguf.h; docs/compress.md).
 * The tokenizer comes from --tokenizer DIR, else SRC (a model dir) or the checkpoint's job model.path;
 * without a tokenizer.json the file holds the weights alone and a notice says so.
 * A PEFT adapter directory or a LoRA run's checkpoint as SRC gives a GGUF LoRA adapter instead (the base
 * from adapter_config.json's base_model_name_or_path unless --model DIR, or from the job's model.path; its
 * weights are not read, only its files checked, and the adapters stream a tensor at a time). A model
 * directory's 2-D tensors are read a piece of rows at a time on the encoding threads (st_gguf_source). */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/gguf.h"
#include "checkpoints/model_dir.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "checkpoints/peft_dir.h"
#include "coordinator/cli/commands.h"
#include "coordinator/config/config.h"
#include "coordinator/trainer/plan.h"
#include "kernels/kernels.h"

static int file_exists(const char *dir, const char *name) {
    char p[4096];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* The job's model.path recorded in a checkpoint (its tokenizer is the run's tokenizer); "" if none. */
static void job_model_path(const char *job_spec, char *out, size_t size) {
    st_json *root = NULL;
    out[0] = 0;
    if (!job_spec || st_json_parse(job_spec, strlen(job_spec), &root)) return;
    const char *p = st_json_get_string(st_json_get(root, "model"), "path", NULL);
    if (p) snprintf(out, size, "%s", p);
    st_json_free(root);
}

/* A LoRA export's base: built from DIR's config.json and its safetensors checked as a load checks them
 * (every tensor present with its shape), but its weights not read (the GGUF adapter holds only the adapters;
 * left untouched, they are not even resident: weights_unread, so that attaching the adapters does not copy
 * them either; the caller clears it after). `load`: read them too (a QLoRA job quantizes the base when its
 * adapters are attached). */
static int open_base(const char *dir, st_model *m, int load) {
    if (load) return st_model_load_dir(dir, st_backend_cpu(1), m);
    st_safetensors *st = NULL;
    int rc = st_model_open_dir(dir, st_backend_cpu(1), m);
    if (rc) return rc;
    if ((rc = st_model_check_files(m, dir, &st))) st_model_free(m);
    else m->weights_unread = 1;
    st_safetensors_close(st);
    return rc;
}

/* A PEFT adapter directory: its base (--model, else base_model_name_or_path) with the adapter loaded. */
static int load_adapter_dir(const char *src, const char *base, st_model *m) {
    char path[4200], base_path[4096];
    char *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/adapter_config.json", src);
    int rc = st_read_file(path, &text, &len);
    if (rc) return st_fail(rc, "%s: %s", path, st_error());
    st_json *j = NULL;
    rc = st_json_parse(text, len, &j);
    free(text);
    if (rc) return st_fail_context(rc, "%s", path);
    const char *named = st_json_get_string(j, "base_model_name_or_path", NULL);
    snprintf(base_path, sizeof base_path, "%s", base ? base : named ? named : "");
    st_json_free(j);
    if (!base_path[0]) return st_fail(ST_EINVAL, "%s names no base model: pass --model DIR", path);
    if ((rc = open_base(base_path, m, 0))) return st_fail_context(rc, "base model %s", base_path);
    rc = st_peft_load_dir(m, src);
    m->weights_unread = 0;
    if (rc) st_model_free(m);
    return rc;
}

/* A LoRA (or QLoRA) run's checkpoint: its base from the job's model.path, the adapters attached as the
 * job did (the export then reads them from the checkpoint a tensor at a time). *is_lora = 0 (nothing
 * built) for any other checkpoint. */
static int load_lora_ckpt(const char *path, const char *job_spec, st_model *m, int *is_lora) {
    st_config *job = calloc(1, sizeof *job);
    if (!job) return st_fail(ST_ENOMEM, "out of memory");
    int loaded = job_spec && !st_config_load_string(job, job_spec, 0, NULL);
    *is_lora = loaded && (job->finetune.mode == ST_FINETUNE_LORA || job->finetune.mode == ST_FINETUNE_QLORA);
    int rc = 0;
    if (loaded && st_config_prompt_learning(job)) /* its /model holds the prompt alone */
        rc = st_fail(ST_EINVAL, "checkpoint %s is from a finetune.mode %s run: GGUF has no prompt-learning adapter "
                     "(export it with --format peft)", path, st_finetune_mode_name(job->finetune.mode));
    if (*is_lora) {
        rc = open_base(job->model.path, m, job->finetune.mode == ST_FINETUNE_QLORA);
        if (rc) rc = st_fail_context(rc, "checkpoint %s: its base model (model.path) %s", path, job->model.path);
        else {
            rc = st_plan_attach_adapters(job, m);
            m->weights_unread = 0;
            if (rc) st_model_free(m);
        }
    }
    free(job);
    return rc;
}

/* Where the streamed export reads its weights, a tensor at a time: a model directory's safetensors (dir.st
 * open) or a checkpoint file; a LoRA export's adapters from that checkpoint or (ckpt "") the model, which
 * an adapter directory's load filled. */
typedef struct {
    st_export_dir_src dir;
    char ckpt[2048];
} gguf_source;

static int fetch_lora(void *ctx, const st_model *m, int i, float *dst) {
    gguf_source *s = ctx;
    if (s->ckpt[0]) return st_ckpt_load_param(s->ckpt, m, i, dst);
    m->be->copy_to_host(dst, m->weights + m->params[i].offset, m->params[i].numel * sizeof(float));
    return 0;
}

static int fetch_source(void *ctx, const st_model *m, int i, float *dst) {
    gguf_source *s = ctx;
    return s->dir.st ? st_export_fetch_model_dir(&s->dir, m, i, dst) : st_export_fetch_ckpt(s->ckpt, m, i, dst);
}

/* A model directory's 2-D tensors are read a piece of rows at a time (st_gguf_source), except GPT-2's
 * Conv1D ones, which the files hold transposed; a checkpoint's tensors come whole (their checksums cover a
 * whole tensor). */
static int ranged_source(void *ctx, const st_model *m, int i) {
    gguf_source *s = ctx;
    return s->dir.st && !m->params[i].transpose_io;
}

/* Rows [r0, r0 + n) of parameter i from the safetensors, NaN / Inf refused naming the tensor and element
 * (as st_export_fetch_model_dir does), checked while the piece is in cache. */
static int rows_source(void *ctx, const st_model *m, int i, int64_t r0, int64_t n, float *dst) {
    gguf_source *s = ctx;
    const st_param *p = &m->params[i];
    size_t cols = (size_t)p->shape[1], a = (size_t)r0 * cols, k = (size_t)n * cols;
    int rc = st_model_read_param_range(s->dir.st, m, i, a, k, dst);
    return rc ? rc : st_check_finite_values(dst, k, a, s->dir.dir, p->name);
}

/* Builds the model from SRC (model dir, adapter dir or checkpoint), its weights left where they are (`from`
 * says where: the export streams them, so neither the weights nor a copy are ever held whole). With
 * adapters (*is_lora): an adapter dir's are loaded into the model, a LoRA checkpoint's stay in it (from->ckpt).
 * tok_dir gets where a tokenizer may be (SRC itself, or a checkpoint's model.path). */
static int load_source(const char *src, const char *base, st_model *m, gguf_source *from, char *tok_dir,
                       size_t tok_size, int *is_lora) {
    const st_backend *be = st_backend_cpu(1);
    int rc;
    *is_lora = 0;
    snprintf(tok_dir, tok_size, "%s", src);
    if (file_exists(src, "adapter_config.json")) {
        *is_lora = 1;
        return load_adapter_dir(src, base, m);
    }
    if (file_exists(src, "config.json")) { /* built, weights untouched (not resident); files checked */
        if ((rc = st_model_open_dir(src, be, m))) return rc;
        if ((rc = st_model_check_files(m, src, &from->dir.st))) st_model_free(m);
        from->dir.dir = src; /* NaN/Inf refused by name as each tensor is read, as eval does */
        return rc;
    }
    {
        char path[2048];
        st_ckpt_info info;
        if ((rc = st_ckpt_resolve(src, path, sizeof path)) || (rc = st_ckpt_read_info(path, &info))) return rc;
        if ((rc = load_lora_ckpt(path, info.job_spec, m, is_lora)) || *is_lora) {
            st_ckpt_info_free(&info);
            if (*is_lora) snprintf(from->ckpt, sizeof from->ckpt, "%s", path);
            return rc;
        }
        st_model_config mc;
        rc = st_model_config_parse(info.model_config, strlen(info.model_config), path, &mc);
        job_model_path(info.job_spec, tok_dir, tok_size);
        st_ckpt_info_free(&info);
        if (rc || (rc = st_model_build(m, &mc, be))) return rc;
        snprintf(from->ckpt, sizeof from->ckpt, "%s", path);
        return 0;
    }
}

/* The adapters of an adapter dir / LoRA checkpoint as a GGUF LoRA adapter (no tokenizer: the base's). */
static int export_lora(const char *src, const char *dst, const char *out, st_model *m, gguf_source *from,
                       st_ggml_type quant, const char *name) {
    st_gguf_options opt = {NULL, name, NULL};
    st_gguf_report rep;
    int rc = st_gguf_export_lora_streamed(m, fetch_lora, from, quant, &opt, dst, &rep);
    st_model_free(m);
    if (rc) return st_cli_error("export", st_error());
    printf("exported %s -> %s (gguf lora adapter %s, %d tensors, %d kept at f16, %.1f MB)\n", src, out,
           st_ggml_type_name(quant), rep.n_tensors, rep.n_fallback, (double)rep.bytes / 1e6);
    return ST_EXIT_OK;
}

int st_export_gguf(const char *src, const char *dst, const char *out, int argc, char **argv) {
    const char *quant_s = "f16", *tok = NULL, *name = NULL, *pre = NULL, *base = NULL;
    int no_tok = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quant") && i + 1 < argc) quant_s = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tok = argv[++i];
        else if (!strcmp(argv[i], "--name") && i + 1 < argc) name = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer-pre") && i + 1 < argc) pre = argv[++i];
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) base = argv[++i];
        else if (!strcmp(argv[i], "--no-tokenizer")) no_tok = 1;
        else if (!strcmp(argv[i], "--force")) continue;
        else if ((!strcmp(argv[i], "--out") || !strcmp(argv[i], "--format")) && i + 1 < argc) i++;
        else if (argv[i][0] == '-') {
            fprintf(stderr, "shardtune export: error: unknown option '%s' for --format gguf\n", argv[i]);
            return ST_EXIT_USAGE;
        }
    }
    if (pre && (!pre[0] || strlen(pre) >= sizeof ((st_gguf_report *)0)->tokenizer_pre || strpbrk(pre, " \t\n"))) {
        fprintf(stderr, "shardtune export: error: --tokenizer-pre '%s' is not a llama.cpp pre-tokenizer name\n", pre);
        return ST_EXIT_USAGE;
    }
    st_ggml_type quant;
    if (st_ggml_type_parse(quant_s, &quant)) return st_cli_error("export", st_error());
    st_model m;
    char found[4096];
    int lora;
    gguf_source from;
    memset(&from, 0, sizeof from);
    if (load_source(src, base, &m, &from, found, sizeof found, &lora)) return st_cli_error("export", st_error());
    if (lora) return export_lora(src, dst, out, &m, &from, quant, name);
    /* the note is printed after a successful export: a failure (a NaN in a tensor read on the way) stays one line */
    char note[4400] = "";
    if (!tok && !no_tok) {
        tok = found;
        if (!found[0] || !file_exists(found, "tokenizer.json")) {
            snprintf(note, sizeof note, "shardtune export: note: no tokenizer.json in %s (pass --tokenizer DIR): the "
                     "GGUF holds the weights without a tokenizer\n", found[0] ? found : src);
            tok = NULL;
        } else if (strcmp(found, src) != 0) {
            snprintf(note, sizeof note, "shardtune export: note: tokenizer from the run's model.path %s\n", found);
        }
    }
    st_gguf_options opt = {no_tok ? NULL : tok, name, pre};
    st_gguf_report rep;
    double t0 = st_now();
    /* each ranged read converts through a 128 KB staging buffer of its own (safetensors.c), which main.c's
     * fixed 128 KB mmap threshold turns into an mmap, 16-32 page faults and a munmap per piece (58K faults
     * and 7K system calls for a 225 MB bf16 model: more system time than the whole read's copy); for the
     * export, such blocks are kept in the heap (and not trimmed back: the export holds no large scratch) */
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    st_gguf_source source = {fetch_source, rows_source, ranged_source, &from};
    int rc = st_gguf_export_source(&m, &source, quant, &opt, dst, &rep);
    double dt = st_now() - t0;
    st_safetensors_close(from.dir.st);
    st_model_free(&m);
    if (rc) return st_cli_error("export", st_error());
    fputs(note, stderr);
    printf("exported %s -> %s (gguf %s, %d tensors, %d %s, tokenizer %s%s%s, %.1f MB in %.2f s)\n", src, out,
           st_ggml_type_name(quant), rep.n_tensors, rep.n_fallback,
           st_ggml_block_size(quant) == 256 ? "in a fallback type (q4_0/q5_0/q5_1/q8_0/f16)" : "kept at f16", rep.has_tokenizer ? rep.tokenizer_model : "none",
           rep.tokenizer_pre[0] ? "/" : "", rep.tokenizer_pre, (double)rep.bytes / 1e6, dt);
    return ST_EXIT_OK;
}
