/* config_keys.h — internal to the config module: the table that describes every config key.
 *
 * One table per YAML mapping (root, each section, a task, a stage). The loader (config.c) walks YAML
 * nodes against these tables and the JSON writer (config_json.c) walks the same tables, so a key
 * added here is parsed, validated for type and range, suggested in did-you-mean, and dumped. Tables
 * are static data; nothing here owns memory. */
#ifndef ST_CONFIG_KEYS_H
#define ST_CONFIG_KEYS_H

#include <stddef.h>

typedef enum {
    ST_KEY_END = 0,  /* terminates a table */
    ST_KEY_SECTION,  /* a nested mapping: `sub` describes the struct at `off` */
    ST_KEY_LIST,     /* a sequence of mappings: elements of `elem_size` at `off`, int count at `count_off` */
    ST_KEY_I32,      /* int, range [lo, hi] */
    ST_KEY_I64,      /* int64_t, range [lo, hi] */
    ST_KEY_F64,      /* double, range lo..hi with ST_KEY_LO_OPEN / ST_KEY_HI_OPEN */
    ST_KEY_F64_LIST, /* double[count] with a fixed count (betas, split), each in the range */
    ST_KEY_BOOL,     /* int 0/1 */
    ST_KEY_STRING,   /* char[size] */
    ST_KEY_ENUM,     /* an enum stored as int; `names` is NULL-terminated */
    ST_KEY_MODULES,  /* unsigned ST_MOD_* mask written as a list of module names */
    ST_KEY_SIGNAL,   /* int signal number written as a name (USR1, ..., none) */
    ST_KEY_RESUME,   /* top-level `resume`: auto | none | PATH (two struct fields) */
    ST_KEY_NAMESET,  /* unsigned mask written as a non-empty list of `names` (bit i = names[i]) */
} st_key_kind;

enum { ST_KEY_LO_OPEN = 1, ST_KEY_HI_OPEN = 2, ST_KEY_NO_HI = 4,
       ST_KEY_UNSET_ZERO = 8 /* 0 = not given: left out of the JSON dump (train.steps / train.epochs) */ };

typedef struct st_key {
    const char *name;
    st_key_kind kind;
    size_t off;              /* offset of the value in the struct this table describes */
    size_t size;             /* STRING: capacity; LIST: element size; F64_LIST: count */
    size_t count_off;        /* LIST: offset of the int element count */
    int max;                 /* LIST: capacity */
    const struct st_key *sub;   /* SECTION / LIST element table */
    const char *const *names;   /* ENUM value names */
    double lo, hi;           /* numeric range */
    int flags;               /* ST_KEY_* range flags */
    void (*elem_defaults)(void *elem); /* LIST: resets one element */
} st_key;

extern const st_key st_config_root_keys[];

extern const char *const st_module_names[]; /* indexed by bit position, NULL-terminated */

#endif
