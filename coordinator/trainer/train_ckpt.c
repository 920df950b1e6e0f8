/* train_ckpt.c — checkpoints from the run loop: save (collective), resume with fallback to an older
 * checkpoint, final weights, and the control word all ranks agree on at a step boundary. */
#include "coordinator/trainer/train_internal.h"
#include "checkpoints/peft_dir.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h" /* retention and `latest` for the divergence guard */
#include "checkpoints/model_io.h"
#include "kernels/bf16.h"
#include "worker/comm_zero3_dev.h" /* st_z3dev_restore_fp32, st_z3dev_put_bf16 */
#include "worker/qlora.h"

/* ---------------- final weights ---------------- */

static int write_final(trainer *t);

/* ZeRO-3: rank 0 writes, the tensors arrive one at a time (st_comm_gather_param: each owner's part of a
 * parameter, gathered on rank 0), so no rank ever holds the whole model. */
static int gather_to_root(void *ctx, const st_model *m, int i, float *dst) {
    trainer *t = ctx;
    return st_comm_gather_param(&t->dp, m, i, dst, 0);
}

int st_trainer_save_final(trainer *t) {
    int streamed = t->dp.stage == 3 && !t->model.lora && !t->model.prompt;
    if (streamed) {
        int rc = t->rank == 0 ? write_final(t) : 0;
        if (t->rank != 0) /* serve rank 0's gathers, parameter by parameter */
            rc = st_model_export_dir_streamed(&t->model, NULL, NULL, NULL, 0, gather_to_root, t);
        return rc;
    }
    /* adapters (ZeRO-3: gathered whole on every rank; st_peft_save_dir reads no base weight) */
    int first = st_model_base_params(&t->model);
    st_model_acquire(&t->model, first, t->model.n_params);
    int rc = t->rank == 0 ? write_final(t) : 0;
    st_model_release(&t->model, first, t->model.n_params);
    return rc;
}

static int write_final(trainer *t) {
    char dir[ST_CFG_PATH_MAX + 16], tmp[ST_CFG_PATH_MAX + 32], old[ST_CFG_PATH_MAX + 32];
    snprintf(dir, sizeof dir, "%s/final", t->cfg->run_dir);
    snprintf(tmp, sizeof tmp, "%s/final.partial", t->cfg->run_dir);
    snprintf(old, sizeof old, "%s/final.old", t->cfg->run_dir);
    if (access(tmp, F_OK) == 0) st_remove_dir_files(tmp); /* left by a crash during an earlier run's write */
    /* the source's config.json text and tokenizer / generation files travel with the weights */
    /* a LoRA run's final/ is the adapter alone, as a peft adapter directory (checkpoints/peft_dir.h) */
    int streamed = t->dp.stage == 3 && !t->model.lora && !t->model.prompt;
    int rc = t->model.lora || t->model.prompt ? st_peft_save_dir(&t->model, tmp, t->cfg->model.path)
             : streamed ? st_model_export_dir_streamed(&t->model, tmp, t->cfg->model.path, t->model_config_text, 0,
                                                       gather_to_root, t)
                        : st_model_export_dir(&t->model, tmp, t->cfg->model.path, t->model_config_text, 0);
    if (rc) {
        rc = st_fail_context(rc, "writing final weights");
        if (access(tmp, F_OK) == 0) st_remove_dir_files(tmp); /* no final.partial/ left behind */
        return rc;
    }
    /* swap in atomically-enough: the previous final/ survives until the new one is complete */
    if (access(dir, F_OK) == 0 && rename(dir, old) != 0)
        return st_fail(ST_EIO, "cannot replace %s: %s", dir, strerror(errno));
    if (rename(tmp, dir) != 0) return st_fail(ST_EIO, "cannot rename %s to %s: %s", tmp, dir, strerror(errno));
    if (access(old, F_OK) == 0) st_remove_dir_files(old); /* best effort: the new final/ is complete */
    return 0;
}

/* ---------------- checkpoints ---------------- */

/* ZeRO-3 resume: this rank's parts of the checkpoint's weights (st_comm_param_keep), one tensor read at a
 * time with its shape and checksum verified as a whole load does, kept in *out (malloc'd: the rank's
 * share, in parameter order) until every check has passed; put_ckpt_parts then writes them in. */
static int read_ckpt_parts(trainer *t, const char *path, float **out) {
    const st_model *m = &t->model;
    size_t total = 0, most = 0;
    for (int i = 0; i < m->n_params; i++) {
        size_t a, b;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        total += b > a ? b - a : 0;
        if (b > a && m->params[i].numel > most) most = m->params[i].numel;
    }
    float *parts = malloc((total ? total : 1) * sizeof(float)), *tmp = malloc((most ? most : 1) * sizeof(float));
    int rc = parts && tmp ? 0 : st_fail(ST_ENOMEM, "out of memory reading checkpoint %s", path);
    size_t at = 0;
    for (int i = 0; i < m->n_params && !rc; i++) {
        size_t a, b;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        if (b <= a) continue;
        if (!(rc = st_ckpt_load_param(path, m, i, tmp))) memcpy(parts + at, tmp + a, (b - a) * sizeof(float));
        at += b - a;
    }
    free(tmp);
    if (rc) free(parts);
    *out = rc ? NULL : parts;
    return rc;
}

/* Elements [a, b) of parameter i from host src into this rank's part: its fp32 place, or (device ZeRO-3, a part
 * held in bf16 only whose values held_exact found bf16 values) rounded, exactly, into its bf16 place a piece at a
 * time. */
static void put_part(trainer *t, int i, size_t a, size_t b, const float *src) {
    if (!st_z3dev_part_held(&t->dp, i)) {
        t->be->copy_to_device(st_model_part(&t->model, i) + a, src, (b - a) * sizeof(float));
        return;
    }
    uint16_t piece[4096];
    for (size_t k = a; k < b; k += 4096) {
        size_t q = b - k < 4096 ? b - k : 4096;
        for (size_t j = 0; j < q; j++) piece[j] = st_float_to_bf16_bits(src[k - a + j]);
        st_z3dev_put_bf16(&t->dp, i, k, q, piece);
    }
}

/* Device ZeRO-3: whether the values about to be written into every rank's parts held in bf16 only are bf16
 * values (then they go there straight, the held set the load's: a frozen parameter keeps the base's values);
 * else the frozen shard gets its fp32 places back first (st_z3dev_restore_fp32). w: this rank's parts packed
 * (packed) or the whole image. Collective. */
static int held_exact(trainer *t, const float *w, int packed) {
    const st_model *m = &t->model;
    int ok = 1;
    for (int i = 0; i < m->n_params; i++) {
        size_t a, b;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        if (b <= a) continue;
        const float *x = packed ? w : w + m->params[i].offset + a;
        if (st_z3dev_part_held(&t->dp, i) && !st_model_bf16_exact(x, b - a)) ok = 0;
        if (packed) w += b - a;
    }
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, t->comm);
    return ok;
}

static void put_ckpt_parts(trainer *t, const float *parts) {
    const st_model *m = &t->model;
    for (int i = 0; i < m->n_params; i++) {
        size_t a, b;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        if (b <= a) continue;
        put_part(t, i, a, b, parts);
        parts += b - a;
    }
}

/* A device ZeRO-3 rank of an adapter mode (the checkpoint's whole image read, the base checked): this rank's
 * parts of it written where it keeps them (worker/comm_zero3_dev.c has no whole weight buffer). QLoRA's
 * quantized tensors have no fp32 place there (their codes are the communicator's, from the model directory;
 * fused, their offsets lie past the image too): skipped. */
static void put_image_parts(trainer *t, const float *w) {
    const st_model *m = &t->model;
    for (int i = 0; i < m->n_params; i++) {
        size_t a, b;
        if (m->qlora && st_qlora_holds(m, i)) continue;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        if (b > a) put_part(t, i, a, b, w + m->params[i].offset + a);
    }
}

/* Both halves of a save end here: the console line, the monitor event and the failure count. */
static int report_save(trainer *t, int rc, int64_t completed, const char *why, const char *name, double secs) {
    const st_config *c = t->cfg;
    if (rc == 0) {
        t->save_failures = 0;
        if (t->rank == 0) {
            printf("checkpoint: %s/%s (%s, %.2f s%s)\n", c->checkpoint.dir, name, why, secs, t->ckpt_bg ? ", background" : "");
            fflush(stdout);
        }
        if (t->mon) st_monitor_event(t->mon, "checkpoint_saved", completed, "%s/%s (%s, %.2f s)", c->checkpoint.dir, name, why, secs);
        return 0;
    }
    t->save_failures++;
    if (t->last_saved == completed) t->last_saved = -1;
    int max = c->checkpoint.max_failures;
    if (t->rank == 0) {
        fprintf(stderr, "shardtune train: warning: checkpoint at step %lld failed (%s): %s (%d in a row", (long long)completed,
                why, st_error(), t->save_failures);
        if (max > 0) fprintf(stderr, "; the job stops at %d, checkpoint.max_failures)\n", max);
        else fprintf(stderr, ")\n");
        fflush(stderr);
    }
    if (t->mon) st_monitor_event(t->mon, "checkpoint_failed", completed, "%s (%d in a row)", st_error(), t->save_failures);
    return rc;
}

/* retention waits until the next step proves these weights sound (st_trainer_confirm_checkpoint), so
 * a checkpoint of weights that then diverge never rotates out the last good one */
static int confirm_later(const char *why) { return !strcmp(why, "periodic") || !strcmp(why, "requested"); }

/* Rank 0, after a save committed: it confirms the previous one and waits for its own confirmation. */
static void committed(trainer *t, const char *why, const char *name) {
    if (t->rank != 0) return;
    st_trainer_confirm_checkpoint(t); /* a save after a good step confirms the previous one */
    if (confirm_later(why)) snprintf(t->pending_ckpt, sizeof t->pending_ckpt, "%s", name);
}

int st_trainer_ckpt_collect(trainer *t) {
    if (!st_ckpt_async_pending(t->ckpt_bg)) return 0;
    int64_t step;
    char name[ST_CKPT_NAME_MAX] = "";
    double secs = 0;
    st_trainer_phase(t, ST_PHASE_CHECKPOINT);
    int rc = st_ckpt_async_wait(t->ckpt_bg, &step, name, &secs);
    st_trainer_phase(t, ST_PHASE_IDLE);
    if (!rc) committed(t, t->bg_why, name);
    return report_save(t, rc, step, t->bg_why, name, secs);
}

/* Collective. Saves the state after `completed` updates. On failure rank 0 prints one line and the
 * previous checkpoints stay as they were; the training state is never touched by a save. With
 * checkpoint.async the step waits for the snapshot only; a save that ends the run (end, signal, ctl
 * stop) then waits for its write too. A failure of the previous background write is counted here. */
int st_trainer_save_checkpoint(trainer *t, int64_t completed, const char *why) {
    const st_config *c = t->cfg;
    int prev_rc = st_trainer_ckpt_collect(t); /* never two writes at once */
    st_trainer_phase(t, ST_PHASE_CHECKPOINT);
    size_t words = st_loader_state_words(&t->loader);
    uint64_t *loader_state = malloc(words * sizeof *loader_state);
    const char *names[ST_CFG_MAX_TASKS];
    uint64_t sums[ST_CFG_MAX_TASKS];
    for (int k = 0; k < t->n_tasks; k++) {
        names[k] = c->tasks[k].name;
        sums[k] = t->datasets[k].checksum;
    }
    int rc = st_trainer_agree(t, loader_state ? 0 : st_fail(ST_ENOMEM, "out of memory"));
    char name[ST_CKPT_NAME_MAX] = "";
    double secs = 0, blocked = 0;
    int background = 0;
    if (!rc) {
        st_loader_state_save(&t->loader, loader_state);
        st_ckpt_meta meta = {0};
        meta.step = completed;
        meta.tokens_seen = t->tokens_seen;
        meta.stage = t->stage;
        meta.last_loss = t->last_loss;
        meta.job_spec = t->job_json;
        meta.model_config = t->model_config_text;
        meta.loader_state = loader_state;
        meta.loader_words = words;
        meta.n_tasks = t->n_tasks;
        meta.task_names = names;
        meta.task_checksums = sums;
        meta.base_checksum = t->base_checksum;
        double tw[1 + 4 * ST_TASKW_MAX];
        if (t->taskw.learned) {
            st_taskw_state_save(&t->taskw, tw);
            meta.task_weighting = tw;
            meta.task_weighting_len = st_taskw_state_len(&t->taskw);
        }
        int keep = confirm_later(why) ? 0 : c->checkpoint.keep_last;
        if (t->ckpt_bg) {
            rc = st_ckpt_async_start(t->ckpt_bg, c->checkpoint.dir, &t->model, &t->optim, &meta, keep, &blocked);
            background = !rc;
        } else {
            rc = st_ckpt_save(t->comm, c->checkpoint.dir, &t->model, &t->optim, &meta, keep, name, &secs);
            blocked = secs;
            if (!rc) committed(t, why, name);
        }
    }
    free(loader_state);
    st_trainer_phase(t, ST_PHASE_IDLE);
    t->ckpt_blocked_ms = blocked * 1e3;
    if (background) {
        t->last_saved = completed;
        t->bg_why = why;
        if (confirm_later(why)) return prev_rc; /* the write goes on while training does */
        return st_trainer_ckpt_collect(t);
    }
    if (rc == 0) t->last_saved = completed;
    rc = report_save(t, rc, completed, why, name, secs);
    return rc ? rc : (confirm_later(why) ? prev_rc : 0);
}

void st_trainer_confirm_checkpoint(trainer *t) {
    if (t->rank != 0 || !t->pending_ckpt[0]) return;
    st_ckpt_retain(t->cfg->checkpoint.dir, t->cfg->checkpoint.keep_last, t->pending_ckpt);
    t->pending_ckpt[0] = 0;
}

void st_trainer_set_aside_checkpoint(trainer *t) {
    const char *dir = t->cfg->checkpoint.dir;
    st_trainer_ckpt_collect(t); /* the write in flight holds the weights that are set aside */
    if (t->rank != 0 || !t->pending_ckpt[0]) return;
    char from[ST_CFG_PATH_MAX + 80], to[ST_CFG_PATH_MAX + 96];
    snprintf(from, sizeof from, "%s/%s", dir, t->pending_ckpt);
    snprintf(to, sizeof to, "%s.diverged", from);
    if (rename(from, to) != 0) {
        fprintf(stderr, "shardtune train: warning: cannot set aside %s: %s\n", from, strerror(errno));
        return;
    }
    char (*names)[ST_CKPT_NAME_MAX] = NULL;
    int n = 0;
    if (st_ckpt_candidates(dir, &names, &n) == 0 && n > 0) st_ckpt_write_latest(dir, names[0]);
    else { snprintf(from, sizeof from, "%s/latest", dir); unlink(from); }
    fprintf(stderr, "shardtune train: %s holds the weights that diverged: moved aside to %s.diverged; latest is now %s\n",
            t->pending_ckpt, t->pending_ckpt, n > 0 ? names[0] : "none");
    fflush(stderr);
    free(names);
    t->pending_ckpt[0] = 0;
}

/* The control word every rank agrees on at a step boundary: any rank's signal flag OR'ed with the
 * control requests rank 0's monitor accepted since the last boundary. */
unsigned st_trainer_control(trainer *t) {
    unsigned bits = st_stop_requested ? CTL_SIGNAL : 0;
    if (st_ckpt_async_running(t->ckpt_bg)) bits |= CTL_CKPT_BUSY;
    if (t->rank == 0 && t->mon) bits |= st_monitor_take_control(t->mon);
    MPI_Allreduce(MPI_IN_PLACE, &bits, 1, MPI_UNSIGNED, MPI_BOR, t->comm);
    return bits;
}

/* One checkpoint file: header, datasets, weights, optimizer range, loader. The trainer's state
 * changes only once everything has been read and verified; *spoiled is set once the weights are being written
 * (a failure after that cannot fall back to another checkpoint or a fresh start). */
static int try_resume(trainer *t, const char *path, int *spoiled) {
    const st_config *c = t->cfg;
    st_ckpt_info info;
    int rc = st_trainer_agree(t, st_ckpt_read_info(path, &info));
    if (rc) return rc;
    for (int k = 0; !rc && k < t->n_tasks; k++) {
        int found = -1;
        for (int j = 0; j < info.n_tasks; j++)
            if (strcmp(info.task_names[j], c->tasks[k].name) == 0) found = j;
        if (found < 0)
            rc = st_fail(ST_ECONFIG, "task '%s' is not in checkpoint %s (the task list changed; use resume: none to start over)",
                         c->tasks[k].name, path);
        else if (info.task_checksums[found] != t->datasets[k].checksum)
            rc = st_fail(ST_ECONFIG, "task '%s': dataset %s changed since checkpoint %s was saved (checksum differs)",
                         c->tasks[k].name, c->tasks[k].path, path);
    }
    if (!rc) rc = st_trainer_check_compat(t, &info, path);
    rc = st_trainer_agree(t, rc);
    /* load the weights and the optimizer in the layout they were saved in (the stage of the last completed
     * step; the loop then enters the stage of the next step, carrying moments over exactly as an
     * uninterrupted run). Entered before anything is read: under ZeRO-3 the stage's trainable set decides
     * which parts of each tensor this rank keeps (st_comm_param_keep), so reading the parts in the start
     * stage's layout and writing them in after the switch would put them at other offsets. */
    int s = info.stage;
    if (!rc && (s < 0 || s >= t->stages.n))
        rc = st_trainer_agree(t, st_fail(ST_ECONFIG, "checkpoint %s was saved in stage %d, but this schedule has %d stage(s)",
                              path, s, t->stages.n));
    if (!rc && s != t->stage) rc = st_trainer_agree(t, st_trainer_enter_stage(t, s));
    /* ZeRO-3 (full, frozen): only this rank's parts, a tensor at a time; else the whole weights */
    int parts = t->dp.stage == 3 && !t->model.lora && !t->model.prompt;
    /* an adapter run below stage 3 on host memory: the base stays as loaded (only checked against the checkpoint's
     * adapter_base_checksum), the image gets the adapters alone (its base pages are never touched) */
    int own_base = !parts && t->dp.stage < 3 && t->be->host_memory && (t->model.lora || t->model.prompt) && !t->model.qlora;
    /* full / frozen / progressive below stage 3 on host memory: no image; the weights are checked a piece at a
     * time here and read straight into the model's own storage once everything else has passed (below).
     * SHARDTUNE_RESUME_IMAGE=1 (tests) keeps the whole image, the path this one must match bit for bit. */
    const char *image_env = getenv("SHARDTUNE_RESUME_IMAGE");
    int in_place = !parts && !t->dp.z3dev && t->dp.stage < 3 && t->be->host_memory && !t->model.lora &&
                   !t->model.prompt && !(image_env && image_env[0] == '1');
    float *w = rc || parts || in_place ? NULL : malloc(t->model.n_weights * sizeof(float));
    if (!rc && parts) rc = st_trainer_agree(t, read_ckpt_parts(t, path, &w));
    else if (!rc && in_place) rc = st_trainer_agree(t, st_ckpt_check_model(path, &t->model));
    else if (!rc) rc = st_trainer_agree(t, !w          ? st_fail(ST_ENOMEM, "out of memory")
                                           : own_base ? st_ckpt_load_adapters(path, &t->model, w)
                                                      : st_ckpt_load_model(path, &t->model, w));
    if (!rc) rc = st_trainer_agree(t, st_trainer_check_model(t, &info, path));
    size_t n = t->optim.hi - t->optim.lo;
    float *mh = NULL, *vh = NULL;
    int *steps = NULL;
    /* ZeRO-3 on host memory: the moments are read straight into the optimizer's own buffers (no second
     * copy of them); zeroed again below if the resume fails after that */
    int direct = (parts || in_place) && t->be->host_memory && t->optim.m && n;
    if (!rc) {
        mh = direct ? t->optim.m : malloc((n ? n : 1) * sizeof(float));
        vh = direct ? t->optim.v : malloc((n ? n : 1) * sizeof(float));
        steps = calloc((size_t)t->model.n_params, sizeof(int));
        rc = st_trainer_agree(t, mh && vh && steps ? 0 : st_fail(ST_ENOMEM, "out of memory"));
    }
    if (!rc) {
        rc = st_ckpt_load_optim(t->comm, path, &t->model, t->optim.lo, t->optim.hi, mh, vh, steps);
        if (rc) t->print_error = t->rank == 0; /* every rank holds the same message */
    }
    if (!rc) {
        /* the job's keys matched, so a loader state that does not fit is a different data set-up, not damage */
        rc = st_loader_state_restore(&t->loader, info.loader_state, info.loader_words);
        if (rc) rc = st_fail(ST_ECONFIG, "checkpoint %s: %s; restore the job's data settings to resume, or set resume: "
                             "none or a new run_dir to start over", path, st_error());
        rc = st_trainer_agree(t, rc);
    }
    if (!rc && t->taskw.learned && info.task_weighting_len > 0 &&
        st_taskw_state_restore(&t->taskw, info.task_weighting, info.task_weighting_len) != 0)
        rc = st_trainer_agree(t, st_fail(ST_ECONFIG, "checkpoint %s: task weighting state is for another number of tasks", path));
    if (!rc && in_place) {
        /* every check passed: the tensors read again, into their places. A failure now (the file changed or
         * broke between the two reads) leaves the weights partly written: not damage to fall back from */
        *spoiled = 1;
        rc = st_ckpt_load_model_in_place(path, &t->model);
        if (rc) rc = st_fail(rc, "%s (read again after its checks passed: the weights are partly overwritten; start the "
                             "job again)", st_error());
        rc = st_trainer_agree(t, rc);
    }
    /* device ZeRO-3: parts held in bf16 only are written there straight when the checkpoint's values are bf16
     * values on every rank, else they get their fp32 places back to be written (held so again below) */
    if (!rc && t->dp.z3dev && !held_exact(t, w, parts)) rc = st_trainer_agree(t, st_z3dev_restore_fp32(&t->dp));
    if (!rc) {
        const st_backend *be = t->be;
        if (parts) put_ckpt_parts(t, w);
        else if (in_place) {} /* read in place above */
        else if (t->dp.z3dev) put_image_parts(t, w);
        else if (own_base) /* the adapters only: the base (its bf16-only tensors too) is the model's own */
            for (int i = 0; i < t->model.n_params; i++) {
                const st_param *p = &t->model.params[i];
                if (!st_ckpt_skips_tensor(&t->model, i))
                    be->copy_to_device(t->model.weights + p->offset, w + p->offset, p->numel * sizeof(float));
            }
        else /* n_w16: QLoRA's bf16-only part has no fp32 place (and came from the model directory, not the checkpoint) */
            be->copy_to_device(t->model.weights + t->model.n_w16, w + t->model.n_w16,
                               (t->model.n_weights - t->model.n_w16) * sizeof(float));
        st_model_weights_changed(&t->model);
        /* every fp32 weight written again: the frozen ones go back to bf16 only below (in place: the bf16-only
         * ones were read into their bf16 copy, or got their fp32 place back, by st_ckpt_load_model_in_place) */
        if (!own_base && !in_place) st_model_fp32_rewritten(&t->model);
        st_comm_weights_loaded(&t->dp, &t->model); /* ZeRO-3 keeps its shard only */
        st_trainer_hold_bf16(t); /* bf16 only, where that is exact (ZeRO-3: its parts; collective) */
        st_optim_restore(&t->optim, &t->model, mh, vh, steps);
        t->start_step = info.step;
        t->last_saved = info.step;
        t->tokens_seen = info.tokens_seen;
        t->last_loss = t->resumed_loss = info.last_loss;
        if (t->rank == 0) {
            const char *base = strrchr(path, '/');
            printf("resumed from %s at step %lld (saved by %d rank%s); loss at save %.6f\n", base ? base + 1 : path,
                   (long long)info.step, info.world_size, info.world_size == 1 ? "" : "s", info.last_loss);
            fflush(stdout);
        }
    }
    free(w);
    if (direct && rc) { /* the optimizer must not keep moments of a resume that did not happen */
        t->be->memset0(t->optim.m, n * sizeof(float));
        t->be->memset0(t->optim.v, n * sizeof(float));
    }
    if (!direct) {
        free(mh);
        free(vh);
    }
    free(steps);
    st_ckpt_info_free(&info);
    return rc;
}

/* A damaged file (unreadable, truncated, failing a checksum) makes auto-resume fall back to the
 * previous checkpoint; a mismatch with the job (shapes, datasets, tasks) is the user's to fix. */
static int is_damage(int rc) { return rc == ST_ECORRUPT || rc == ST_EFORMAT || rc == ST_EIO; }

static int resume_any(trainer *t);

/* SHARDTUNE_REPORT_LOAD_RSS=1 (tests, bench): the peak RSS before and after the resume, measured */
int st_trainer_resume(trainer *t) {
    const char *report = getenv("SHARDTUNE_REPORT_LOAD_RSS");
    struct rusage ru;
    long before = report && !strcmp(report, "1") && getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : -1;
    int rc = resume_any(t);
    if (!rc && t->dp.z3dev) rc = st_trainer_agree(t, t->be->status()); /* a device fault while resuming is the resume's */
    if (before >= 0 && getrusage(RUSAGE_SELF, &ru) == 0)
        fprintf(stderr, "shardtune train: rank %d: peak RSS before the resume %ld kB, after it %ld kB\n", t->rank, before,
                ru.ru_maxrss);
    return rc;
}

static int resume_any(trainer *t) {
    const st_config *c = t->cfg;
    t->resumed_loss = NAN;
    if (c->resume == ST_RESUME_NONE) {
        if (t->rank == 0) printf("resume: none -> starting from step 0\n");
        return 0;
    }
    if (c->resume == ST_RESUME_PATH) {
        char path[ST_CFG_PATH_MAX + ST_CKPT_NAME_MAX + 2];
        int rc = st_trainer_agree(t, st_ckpt_resolve(c->resume_path, path, sizeof path));
        if (rc) return rc;
        if (t->rank == 0) {
            printf("resume: %s -> trying %s (no fallback: a checkpoint that cannot be used stops the job)\n",
                   c->resume_path, path);
            fflush(stdout);
        }
        int spoiled = 0;
        return try_resume(t, path, &spoiled);
    }
    /* auto: rank 0 lists the directory, everyone tries the candidates in the same order */
    char (*names)[ST_CKPT_NAME_MAX] = NULL;
    int n = 0;
    int rc = t->rank == 0 ? st_ckpt_candidates(c->checkpoint.dir, &names, &n) : 0;
    if ((rc = st_trainer_agree(t, rc))) return rc;
    MPI_Bcast(&n, 1, MPI_INT, 0, t->comm);
    if (t->rank != 0 && n > 0 && !(names = calloc((size_t)n, ST_CKPT_NAME_MAX))) n = -1;
    if ((rc = st_trainer_agree(t, n < 0 ? st_fail(ST_ENOMEM, "out of memory") : 0))) return rc;
    if (n > 0) MPI_Bcast(names, n * ST_CKPT_NAME_MAX, MPI_CHAR, 0, t->comm);
    if (t->rank == 0 && n > 0) {
        printf("resume: auto -> %d checkpoint(s) in %s, trying %s (a checkpoint of another run stops the job)\n", n,
               c->checkpoint.dir, names[0]);
        fflush(stdout);
    }
    for (int i = 0; i < n; i++) {
        char path[ST_CFG_PATH_MAX + ST_CKPT_NAME_MAX + 2];
        snprintf(path, sizeof path, "%s/%s", c->checkpoint.dir, names[i]);
        int spoiled = 0;
        rc = try_resume(t, path, &spoiled);
        /* not yet proven by a good step after it (the run that saved it may have died first): a first step
         * that diverges sets it aside like a checkpoint of this run */
        if (rc == 0 && t->rank == 0) snprintf(t->pending_ckpt, sizeof t->pending_ckpt, "%s", names[i]);
        if (rc == 0 || !is_damage(rc) || spoiled) break;
        if (t->rank == 0) {
            fprintf(stderr, "shardtune train: warning: checkpoint %s is unusable (%s); falling back to %s\n", path,
                    st_error(), i + 1 < n ? names[i + 1] : "a fresh start");
            fflush(stderr);
        }
        rc = 0;
        t->print_error = 1;
    }
    if (rc == 0 && t->start_step == 0 && t->rank == 0)
        printf("resume: auto -> no %scheckpoint in %s, starting from step 0\n", n > 0 ? "usable " : "", c->checkpoint.dir);
    free(names);
    return rc;
}

