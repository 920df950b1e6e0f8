/* cmd_ctl.c — `shardtune ctl ADDR status|checkpoint|stop|pause|resume [--token-file F | --run-dir DIR]
 *                              [--server-key FILE] [--timeout S]`
 * Sends one ControlRequest to the job's REP socket (monitor.control), prints the reply text, and exits
 * 0 when the job accepted it, 1 when refused or unreachable. With --server-key, or --run-dir when
 * DIR/monitor.pub exists (a job with monitor.curve: true), the connection is a CURVE client of that key. */
#include "common/error.h"
#include "coordinator/cli/commands.h"
#include "coordinator/monitor/control_token.h"
#include "coordinator/monitor/monitor_rules.h"
#include "shardtune.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static int ctl_usage(void) {
    fprintf(stderr, "usage: shardtune ctl [ADDR] status|checkpoint|stop|pause|resume "
                    "[--run-dir DIR | --token-file F] [--server-key FILE] [--timeout S]\n");
    return ST_EXIT_USAGE;
}

/* One request, one reply, bounded by timeout_ms; 0 ok / 1 refused / -1 transport failure (message set).
 * server_key: the job's CURVE public key, or NULL for a plain connection; key_from names its file. */
static int ctl_roundtrip(const char *addr, const char *server_key, const char *key_from, const uint8_t *req,
                         size_t reqlen, int timeout_ms, Shardtune__ControlReply **reply) {
    void *ctx = zmq_ctx_new();
    void *s = ctx ? zmq_socket(ctx, ZMQ_REQ) : NULL;
    int linger = 0, rc = -1;
    *reply = NULL;
    if (!s) {
        st_fail(ST_ECOMM, "cannot create a ZeroMQ socket");
        goto out;
    }
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms);
    if (server_key && st_curve_client_setup(s, server_key) != 0) goto out;
    if (zmq_connect(s, addr) != 0) {
        st_fail(ST_ECOMM, "bad control address '%s': %s", addr, zmq_strerror(zmq_errno()));
        goto out;
    }
    if (zmq_send(s, req, reqlen, 0) < 0) {
        st_fail(ST_ECOMM, "cannot send to %s within %.1f s (is the job running?)", addr, timeout_ms / 1e3);
        goto out;
    }
    uint8_t buf[8192];
    int n = zmq_recv(s, buf, sizeof buf, 0);
    if (n < 0) {
        /* A CURVE/plain mismatch looks exactly like a dead job: the handshake just never completes. */
        if (server_key)
            st_fail(ST_ECOMM, "no reply from %s within %.1f s over CURVE with the server key in %s (is the job "
                    "running, is this monitor.control, and is the key from this run of the job?)", addr,
                    timeout_ms / 1e3, key_from);
        else
            st_fail(ST_ECOMM, "no reply from %s within %.1f s (is the job running and is this monitor.control? "
                    "if the job runs with monitor.curve: true, pass --run-dir or --server-key)", addr,
                    timeout_ms / 1e3);
        goto out;
    }
    if ((size_t)n > sizeof buf || !(*reply = shardtune__control_reply__unpack(NULL, (size_t)n, buf))) {
        st_fail(ST_EFORMAT, "the reply from %s is not a ControlReply", addr);
        goto out;
    }
    rc = (*reply)->ok ? 0 : 1;
out:
    if (s) zmq_close(s);
    if (ctx) zmq_ctx_term(ctx);
    return rc;
}

int st_cmd_ctl(int argc, char **argv) {
    if (argc < 2) return ctl_usage();
    /* ADDR is optional: `ctl stop --run-dir DIR` reads RUN_DIR/monitor.addr (or the token file's directory's);
     * flags may come before or after the positional ADDR and COMMAND */
    const char *pos[2] = {NULL, NULL};
    int n_pos = 0;
    const char *token_file = NULL, *run_dir = NULL, *server_key_file = NULL;
    char addr_buf[1024];
    double timeout_s = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--token-file") && i + 1 < argc) token_file = argv[++i];
        else if (!strcmp(argv[i], "--run-dir") && i + 1 < argc) run_dir = argv[++i];
        else if (!strcmp(argv[i], "--server-key") && i + 1 < argc) server_key_file = argv[++i];
        else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
            int rc = st_cli_real("ctl", "--timeout", argv[++i], 0, 1e9, &timeout_s);
            if (rc) return rc;
        }
        else if (argv[i][0] != '-' && n_pos < 2) pos[n_pos++] = argv[i];
        else {
            fprintf(stderr, "shardtune ctl: error: unknown argument '%s'\n", argv[i]);
            return ctl_usage();
        }
    }
    if (n_pos == 0) {
        fprintf(stderr, "shardtune ctl: error: missing the command (status|checkpoint|stop|pause|resume)\n");
        return ctl_usage();
    }
    const char *addr = n_pos == 2 ? pos[0] : NULL, *cmdname = pos[n_pos - 1];
    int command = st_command_from_name(cmdname);
    if (command < 0) {
        fprintf(stderr, "shardtune ctl: error: unknown command '%s' (status|checkpoint|stop|pause|resume)\n", cmdname);
        return ST_EXIT_USAGE;
    }
    if (timeout_s <= 0 || timeout_s > 3600) timeout_s = 5;
    if (!addr) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s", run_dir ? run_dir : token_file ? token_file : "");
        if (!run_dir) { char *slash = strrchr(dir, '/'); if (slash) *slash = 0; else snprintf(dir, sizeof dir, "."); }
        if (!run_dir && !token_file)
            return st_cli_missing("ctl", "ADDR: pass the job's monitor.control address, --run-dir DIR or --token-file F");
        if (st_monitor_addr_read(dir, "control", addr_buf, sizeof addr_buf)) return st_cli_error("ctl", st_error());
        addr = addr_buf;
    }
    char token[ST_TOKEN_BUF] = "";
    if (token_file && st_token_read_file(token_file, token) != 0) return st_cli_error("ctl", st_error());
    if (!token_file && run_dir && st_token_read(run_dir, token) != 0) return st_cli_error("ctl", st_error());
    char server_key[ST_CURVE_KEY_BUF], key_from[4096];
    int curve = st_curve_client_key(server_key_file, run_dir, server_key, key_from, sizeof key_from);
    if (curve < 0) return st_cli_error("ctl", st_error());

    Shardtune__ControlRequest req = SHARDTUNE__CONTROL_REQUEST__INIT;
    req.version = 1;
    req.command = (Shardtune__Command)command;
    req.token = token;
    uint8_t buf[256];
    size_t len = shardtune__control_request__pack(&req, buf);
    Shardtune__ControlReply *reply;
    int rc = ctl_roundtrip(addr, curve ? server_key : NULL, key_from, buf, len, (int)(timeout_s * 1000), &reply);
    if (rc < 0) return st_cli_error("ctl", st_error());
    printf("%s: %s\n", reply->ok ? "ok" : "refused", reply->text ? reply->text : "");
    shardtune__control_reply__free_unpacked(reply, NULL);
    return rc == 0 ? ST_EXIT_OK : ST_EXIT_FAIL;
}
