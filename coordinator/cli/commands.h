/* commands.h — the CLI subcommands (one function per `shardtune <cmd>`).
 * Each takes the arguments after the command name (argv[0] is the command name) and returns
 * the process exit code. Only these functions print to stdout/stderr. */
#ifndef ST_COMMANDS_H
#define ST_COMMANDS_H

#include <stddef.h>
#include <stdint.h>

#include "checkpoints/model_io.h"

/* Exit codes shared by all commands (documented in docs/cli.md). */
enum {
    ST_EXIT_OK = 0,
    ST_EXIT_FAIL = 1,        /* the one-line error says why */
    ST_EXIT_USAGE = 2,       /* bad command line */
    ST_EXIT_DIVERGED = 3,    /* train: stopped on a non-finite loss / grad norm (train.on_nonfinite) */
    ST_EXIT_REQUEUE = 85,    /* checkpointed on a signal or `ctl stop`: please requeue / resume */
    ST_EXIT_HUNG = 86,       /* train: the collective watchdog aborted the job (a rank never arrived) */
};

int st_cmd_init_model(int argc, char **argv);
int st_cmd_data(int argc, char **argv);
int st_cmd_train(int argc, char **argv);
int st_cmd_eval(int argc, char **argv);
int st_cmd_plan(int argc, char **argv);
int st_cmd_ckpt(int argc, char **argv);
int st_cmd_export(int argc, char **argv);
/* `export SRC --out FILE --format gguf ...` (cmd_export_gguf.c); argv as st_cmd_export's; writes `dst`
 * (the temporary sibling of OUT), names `out` in what it prints. */
int st_export_gguf(const char *src, const char *dst, const char *out, int argc, char **argv);
/* The streamed exports' sources (st_model_fetch_fn, cmd_export.c), parameter i in registry layout: from a
 * checkpoint file (ctx: its path; shapes and checksums verified) and from a model directory's safetensors
 * (ctx: st_export_dir_src; NaN / Inf refused naming the tensor, as eval and train do). */
typedef struct {
    st_safetensors *st; /* st_model_check_files' open handle */
    const char *dir;
} st_export_dir_src;
int st_export_fetch_ckpt(void *ctx, const st_model *m, int i, float *dst);
int st_export_fetch_model_dir(void *ctx, const st_model *m, int i, float *dst);
int st_cmd_compress(int argc, char **argv);
int st_cmd_monitor(int argc, char **argv);
int st_cmd_ctl(int argc, char **argv);
int st_cmd_plot(int argc, char **argv);
int st_cmd_generate(int argc, char **argv);
int st_cmd_compare(int argc, char **argv);
int st_cmd_tokenize(int argc, char **argv);

/* Prints "shardtune <cmd>: error: <msg>" to stderr (one line) and returns ST_EXIT_FAIL. */
int st_cli_error(const char *cmd, const char *msg);

/* A bad command line, before the command prints its usage: "shardtune <cmd>: error: unknown or incomplete
 * argument '<arg>'" / "shardtune <cmd>: error: missing <what>" on stderr; both return ST_EXIT_USAGE. */
int st_cli_bad_arg(const char *cmd, const char *arg);
int st_cli_missing(const char *cmd, const char *what);

/* A flag's number, strictly (common/util.h st_parse_*): 0, or prints "shardtune <cmd>: error: <flag>:
 * expected ..., got '<text>'" and returns ST_EXIT_USAGE. Use: if ((rc = st_cli_int(...))) return rc; */
int st_cli_int(const char *cmd, const char *flag, const char *text, int64_t lo, int64_t hi, int64_t *out);
int st_cli_real(const char *cmd, const char *flag, const char *text, double lo, double hi, double *out);

/* The OUT of a command that writes a file or a directory (init-model, export, data pack): an existing non-empty
 * OUT is refused ("shardtune <cmd>: error: OUT already exists and is not empty (pass --force to replace it)",
 * ST_EXIT_FAIL) unless `force`; the command writes to `tmp` instead (a sibling, OUT.tmp-PID, a stale one removed)
 * and then calls st_cli_out_end, so a failure never leaves a half-written OUT. 0 or the exit code. */
int st_cli_out_begin(const char *cmd, const char *out, int force, char *tmp, size_t cap);
/* ok: tmp renamed to OUT (a replaced OUT is moved aside first, removed after); 0, or the error printed and
 * ST_EXIT_FAIL. !ok: tmp removed, OUT as it was; returns 0. */
int st_cli_out_end(const char *cmd, const char *out, const char *tmp, int ok);

#endif
