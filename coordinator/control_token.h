/* control_token.h — the job's control token: RUN_DIR/control.token, mode 0600, 32 random hex chars,
 * new for every job. Whoever can read it may send state-changing control commands (checkpoint,
 * stop, pause, resume); STATUS needs none. Tokens are written into caller buffers of
 * ST_TOKEN_BUF bytes (32 hex + NUL). */
#ifndef ST_CONTROL_TOKEN_H
#define ST_CONTROL_TOKEN_H

#define ST_TOKEN_BUF 33
#define ST_TOKEN_FILE "control.token"

/* Creates RUN_DIR/control.token with a fresh token from /dev/urandom. A token file left by a previous
 * job is removed first; the new file is created with O_EXCL and mode 0600 so it is never readable by
 * others, not even briefly. 0 or ST_EIO naming the path. */
int st_token_create(const char *run_dir, char out[ST_TOKEN_BUF]);

/* Reads RUN_DIR/control.token. */
int st_token_read(const char *run_dir, char out[ST_TOKEN_BUF]);

/* Reads a token file: exactly 32 hex chars (a trailing newline is allowed). Refuses a file that
 * group or others can read (ST_EINVAL, saying to chmod 600). */
int st_token_read_file(const char *path, char out[ST_TOKEN_BUF]);

#endif
