/* gen_run.h — what `generate` and `compare` share: reading a prompts JSONL file, generating answers for
 * every prompt across the MPI ranks (whole batches per rank, so the output does not depend on the number
 * of ranks), and the flags of the token choice. Implemented in gen_run.c.
 *
 * Memory: st_prompt_set and st_answer arrays are owned by the caller and released with the *_free
 * functions here. Errors set st_error() and return a negative ST_E*; nothing here prints. */
#ifndef ST_GEN_RUN_H
#define ST_GEN_RUN_H

#include <mpi.h>
#include <stdint.h>

#include "common/json.h"
#include "worker/generate.h"

typedef struct {
    char *line;     /* the input line's JSON object text, trimmed */
    long line_no;   /* 1-based, for messages */
    char *id;       /* its "id" (string or number as text), else its 0-based line number */
    int32_t *ids;   /* prompt token ids ("input_ids"); NULL for a text prompt, encoded per model */
    int n_ids;
    int is_text;    /* "prompt" / "messages" without "input_ids": the model's tokenizer encodes it */
} st_prompt;

typedef struct {
    st_prompt *p;
    int n;
} st_prompt_set;

typedef struct {
    int32_t *ids;
    int n;
    st_gen_finish finish;
    char *text; /* decoded answer when the model has a tokenizer (rank 0), else NULL */
} st_answer;

/* Reads prompts: one JSON object a line ({"input_ids": [...]}, or {"prompt": "..."} / {"messages": [...]}
 * when the build has tokenizer support). Blank lines are skipped. Every error names the file and line. */
int st_prompts_read(const char *path, st_prompt_set *ps);
void st_prompts_free(st_prompt_set *ps);

/* Generation settings from the command line: parses argv[*i] (and its value) when it is one of
 * --max-new --temperature --top-p --top-k --seed --repetition-penalty --batch --backend --stop --chat
 * --timing; returns 1 when consumed, 0 when not one of these, negative (message in st_error()) on a bad
 * value. */
#define ST_GEN_MAX_STOP 16
typedef struct {
    st_gen_params gp;
    char backend[8]; /* auto | cpu | cuda */
    int timing;      /* --timing: the command prints rank 0's prefill and decode tokens/s */
    st_gen_stats *stats; /* optional out: this rank's timing (st_gen_run fills it) */
    int chat;        /* --chat: "prompt" lines become one user message through the chat template */
    const char *stop[ST_GEN_MAX_STOP]; /* --stop STR (repeatable): stop once the answer's text holds one */
    int n_stop;
    const char *adapter; /* --adapter DIR: a PEFT LoRA adapter merged into the weights after loading */
} st_gen_flags;
void st_gen_flags_default(st_gen_flags *f);
int st_gen_flags_parse(st_gen_flags *f, int argc, char **argv, int *i);

/* Loads MODEL_DIR on every rank, reads its end tokens (generation_config.json eos_token_id, a number or
 * a list, else config.json's eos), generates every prompt (rank r runs batches r, r+P, ...) and gathers
 * the answers on rank 0 in input order (answers[n], rank 0 only; other ranks get NULL). `dump`, when not
 * NULL (one rank only), receives malloc'ed logits: per prompt in order, n_out rows of vocab floats, and
 * *vocab the vocabulary size. Collective over `comm`; every rank returns the same status, and *print_error is set on the one rank (the
 * lowest that failed) whose st_error() holds the cause. */
int st_gen_run(const char *model_dir, const st_gen_flags *f, const st_prompt_set *ps, MPI_Comm comm,
               st_answer **answers, float **dump, int *vocab, int *print_error);
/* The same on a model the caller already holds whole on every rank (the trainer's current weights: only
 * read). model_dir gives the tokenizer and the end tokens; f->backend and f->adapter are not used. */
int st_gen_run_model(const st_model *m, const char *model_dir, const st_gen_flags *f, const st_prompt_set *ps,
                     MPI_Comm comm, st_answer **answers, float **dump, int *vocab, int *print_error);
void st_answers_free(st_answer *a, int n);

/* JSONL walking: from *cursor (inside [.., end)), finds the next non-blank line, trimmed of spaces, tabs
 * and CRs, and its 0-based line number (*ln counts every line passed). Returns 0 at the end. */
int st_jsonl_next(char **cursor, const char *end, long *ln, char **line, size_t *len);

/* A JSON "id" value as text (a string, or an integer printed); 0, or -1 when it is neither. */
int st_json_id_text(const st_json *id, char *buf, size_t size);

/* "eos" | "length" | "stop" | "max_positions" */
const char *st_gen_finish_name(st_gen_finish f);

#endif
