/* control_token.h — the job's access files in RUN_DIR, all new for every job:
 *   control.token  mode 0600, 32 random hex chars. Whoever can read it may send state-changing control
 *                  commands (checkpoint, stop, pause, resume); STATUS needs none.
 *   monitor.key    mode 0600, the CURVE server SECRET key (40 Z85 chars), only with monitor.curve: true.
 *   monitor.pub    mode 0644, the matching CURVE server PUBLIC key; clients (`shardtune ctl/monitor
 *                  --run-dir`, or a copy given with --server-key) use it to authenticate the job and
 *                  encrypt the connection.
 *   monitor.addr   mode 0644, the addresses the job's PUB and REP sockets bound (a "*" port resolved), two
 *                  lines "publish ADDR" and "control ADDR" ("-" for a socket that is off); `shardtune
 *                  monitor/ctl --run-dir` read it when no ADDR is given.
 * Tokens and keys are written into caller buffers (ST_TOKEN_BUF / ST_CURVE_KEY_BUF bytes, NUL-terminated).
 * Nothing here ever puts a secret into an error message. */
#ifndef ST_CONTROL_TOKEN_H
#define ST_CONTROL_TOKEN_H

#include <stddef.h>

#define ST_TOKEN_BUF 33
#define ST_TOKEN_FILE "control.token"

#define ST_CURVE_KEY_LEN 40 /* Z85 text of a 32-byte Curve25519 key */
#define ST_CURVE_KEY_BUF 41
#define ST_CURVE_SECRET_FILE "monitor.key"
#define ST_CURVE_PUBLIC_FILE "monitor.pub"
#define ST_MONITOR_ADDR_FILE "monitor.addr"

/* Creates RUN_DIR/control.token with a fresh token from /dev/urandom. A token file left by a previous
 * job is removed first; the new file is created with O_EXCL and mode 0600 so it is never readable by
 * others, not even briefly. 0 or ST_EIO naming the path. */
int st_token_create(const char *run_dir, char out[ST_TOKEN_BUF]);

/* Reads RUN_DIR/control.token. */
int st_token_read(const char *run_dir, char out[ST_TOKEN_BUF]);

/* Reads a token file: exactly 32 hex chars (a trailing newline is allowed). Refuses a file that
 * group or others can read (ST_EINVAL, saying to chmod 600). */
int st_token_read_file(const char *path, char out[ST_TOKEN_BUF]);

/* 1 when this libzmq can do CURVE (built with libsodium), else 0. */
int st_curve_available(void);

/* Generates a fresh CURVE server keypair (zmq_curve_keypair) and writes RUN_DIR/monitor.key (secret,
 * 0600) and RUN_DIR/monitor.pub (public, 0644), one Z85 line each. Each file is written to a new
 * temporary name (O_EXCL, final mode from the start) and renamed over the old one, so a reader sees
 * either the previous job's complete file or this one's. 0, ST_EINVAL when CURVE is unavailable,
 * or ST_EIO naming the path. */
int st_curve_keys_create(const char *run_dir, char public_z85[ST_CURVE_KEY_BUF], char secret_z85[ST_CURVE_KEY_BUF]);

/* Removes RUN_DIR/monitor.key and monitor.pub if present (a job without monitor.curve, so clients with
 * --run-dir do not try CURVE against a plain server). 0 or ST_EIO. */
int st_curve_keys_remove(const char *run_dir);

/* Reads one Z85 key file: exactly 40 Z85 characters that decode to 32 bytes (a trailing newline is
 * allowed). With is_secret, refuses a file that group or others can read (ST_EINVAL, chmod 600).
 * ST_EIO (cannot open), ST_EFORMAT (malformed), each naming the file and never echoing its content. */
int st_curve_key_read_file(const char *path, int is_secret, char out[ST_CURVE_KEY_BUF]);

/* The server public key a client should use: server_key_file if given (must be valid), else
 * RUN_DIR/monitor.pub when it exists, else none. Returns 1 with out filled and from (from_n bytes)
 * naming the file, 0 when the client should connect without CURVE, or a negative ST_E* code. */
int st_curve_client_key(const char *server_key_file, const char *run_dir, char out[ST_CURVE_KEY_BUF], char *from,
                        size_t from_n);

/* Makes a not-yet-connected ZeroMQ socket a CURVE client of the server with this public key, with a
 * fresh ephemeral client keypair (the server does not authenticate clients: the token does). 0 or
 * ST_ECOMM. */
int st_curve_client_setup(void *zmq_socket, const char server_public_z85[ST_CURVE_KEY_BUF]);

/* Makes a not-yet-bound ZeroMQ socket a CURVE server with this secret key (40 Z85 chars). 0, ST_EINVAL
 * (not a 40-char key) or ST_ECOMM. */
int st_curve_server_setup(void *zmq_socket, const char *secret_z85);

/* Writes RUN_DIR/monitor.addr atomically ("" = that socket is off). 0 or ST_EIO naming the path. */
int st_monitor_addr_write(const char *run_dir, const char *publish, const char *control);

/* Reads the address `which` ("publish" or "control") from RUN_DIR/monitor.addr into out. ST_EIO when the
 * file is missing (the job has not started, or it is another RUN_DIR), ST_EINVAL when the job runs without
 * that socket, each naming the path. */
int st_monitor_addr_read(const char *run_dir, const char *which, char *out, size_t size);

#endif
