/* test_telemetry.c — unit tests of the telemetry decisions that need no sockets: control token file,
 * control request validation (garbage, oversize, tokens), stall and straggler detection with injected
 * clocks, and the probe; CURVE key files (modes, atomic replacement, round trip, malformed files), plus
 * one CURVE REQ/REP pair on loopback (the right key is answered; a wrong key or a plain client never is).
 * Requests are built with protobuf-c here and by hand (raw wire bytes) so the decoder is checked against
 * an independent encoding. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/error.h"
#include "coordinator/monitor/control_token.h"
#include "coordinator/monitor/monitor_rules.h"
#include "coordinator/monitor/telemetry.h"
#include "shardtune.pb-c.h"
#include "test_tmpdir.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

/* Not st_test_dir_teardown's rm -rf: removing only the known files and then the directory also checks
 * that nothing left a stray temporary file behind. */
static int teardown_dir(void **state) {
    (void)state;
    char path[512];
    const char *names[] = {ST_TOKEN_FILE, ST_CURVE_SECRET_FILE, ST_CURVE_PUBLIC_FILE, "bad.key"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", st_test_dir, names[i]);
        unlink(path);
    }
    assert_int_equal(rmdir(st_test_dir), 0); /* also: no stray temporary files left behind */
    return 0;
}

static void test_token_create_mode_and_read(void **state) {
    (void)state;
    umask(0); /* the file must be 0600 even when the umask would allow more */
    char tok[ST_TOKEN_BUF], again[ST_TOKEN_BUF], back[ST_TOKEN_BUF];
    assert_int_equal(st_token_create(st_test_dir, tok), 0);
    umask(022);
    assert_int_equal(strlen(tok), 32);
    for (int i = 0; i < 32; i++) assert_non_null(strchr("0123456789abcdef", tok[i]));
    char path[512];
    snprintf(path, sizeof path, "%s/%s", st_test_dir, ST_TOKEN_FILE);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(st_token_read(st_test_dir, back), 0);
    assert_string_equal(back, tok);
    /* a new job gets a new token, replacing the old file */
    assert_int_equal(st_token_create(st_test_dir, again), 0);
    assert_string_not_equal(again, tok);
    assert_int_equal(st_token_read(st_test_dir, back), 0);
    assert_string_equal(back, again);
}

static void test_token_read_refuses_bad_files(void **state) {
    (void)state;
    char tok[ST_TOKEN_BUF], path[512];
    assert_int_equal(st_token_create(st_test_dir, tok), 0);
    snprintf(path, sizeof path, "%s/%s", st_test_dir, ST_TOKEN_FILE);
    chmod(path, 0644);
    assert_int_equal(st_token_read_file(path, tok), ST_EINVAL);
    assert_non_null(strstr(st_error(), "chmod 600"));
    chmod(path, 0600);
    FILE *f = fopen(path, "w");
    fputs("not-hex-not-hex-not-hex-not-hex!\n", f);
    fclose(f);
    assert_int_equal(st_token_read_file(path, tok), ST_EFORMAT);
    f = fopen(path, "w");
    fputs("abcd\n", f);
    fclose(f);
    assert_int_equal(st_token_read_file(path, tok), ST_EFORMAT);
    assert_int_equal(st_token_read("/nonexistent/dir", tok), ST_EIO);
    assert_non_null(strstr(st_error(), "/nonexistent/dir/control.token"));
}

/* ---- control decoding ---- */

static const char *job = "0123456789abcdef0123456789abcdef";

static size_t pack_request(int cmd, const char *token, uint8_t *buf) {
    Shardtune__ControlRequest r = SHARDTUNE__CONTROL_REQUEST__INIT;
    r.version = 1;
    r.command = (Shardtune__Command)cmd;
    r.token = (char *)token;
    return shardtune__control_request__pack(&r, buf);
}

static void test_control_tokens(void **state) {
    (void)state;
    uint8_t buf[256];
    char why[256];
    int cmd;
    unsigned bits;
    size_t n = pack_request(SHARDTUNE__COMMAND__STATUS, "", buf);
    assert_int_equal(st_control_decide(buf, n, job, &cmd, &bits, why, sizeof why), 1);
    assert_int_equal(cmd, 0);
    assert_int_equal(bits, 0);
    n = pack_request(SHARDTUNE__COMMAND__STOP, "", buf);
    assert_int_equal(st_control_decide(buf, n, job, &cmd, &bits, why, sizeof why), 0);
    assert_non_null(strstr(why, "token is required"));
    n = pack_request(SHARDTUNE__COMMAND__STOP, "0123456789abcdef0123456789abcdee", buf);
    assert_int_equal(st_control_decide(buf, n, job, &cmd, &bits, why, sizeof why), 0);
    assert_non_null(strstr(why, "wrong token"));
    n = pack_request(SHARDTUNE__COMMAND__STOP, "0123", buf); /* prefix of the token */
    assert_int_equal(st_control_decide(buf, n, job, &cmd, &bits, why, sizeof why), 0);
    n = pack_request(SHARDTUNE__COMMAND__STOP, job, buf);
    assert_int_equal(st_control_decide(buf, n, NULL, &cmd, &bits, why, sizeof why), 0); /* job without token */
    struct { int cmd; unsigned bit; } want[] = {{SHARDTUNE__COMMAND__CHECKPOINT, ST_CTL_CHECKPOINT},
                                               {SHARDTUNE__COMMAND__STOP, ST_CTL_STOP},
                                               {SHARDTUNE__COMMAND__PAUSE, ST_CTL_PAUSE},
                                               {SHARDTUNE__COMMAND__RESUME, ST_CTL_RESUME}};
    for (int i = 0; i < 4; i++) {
        n = pack_request(want[i].cmd, job, buf);
        assert_int_equal(st_control_decide(buf, n, job, &cmd, &bits, why, sizeof why), 1);
        assert_int_equal(cmd, want[i].cmd);
        assert_int_equal(bits, want[i].bit);
    }
}

static void test_control_hand_encoded(void **state) {
    (void)state;
    /* field 2 (command) varint = 2 (STOP): tag 0x10; field 3 (token) length-delimited: tag 0x1a */
    uint8_t buf[64] = {0x08, 0x01, 0x10, 0x02, 0x1a, 32};
    memcpy(buf + 6, job, 32);
    char why[256];
    int cmd;
    unsigned bits;
    assert_int_equal(st_control_decide(buf, 38, job, &cmd, &bits, why, sizeof why), 1);
    assert_int_equal(bits, ST_CTL_STOP);
    /* unknown command number 9 */
    uint8_t bad[] = {0x10, 0x09};
    assert_int_equal(st_control_decide(bad, sizeof bad, job, &cmd, &bits, why, sizeof why), 0);
    assert_non_null(strstr(why, "unknown command"));
    /* negative command (10-byte varint) */
    uint8_t neg[] = {0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    assert_int_equal(st_control_decide(neg, sizeof neg, job, &cmd, &bits, why, sizeof why), 0);
}

static void test_control_garbage(void **state) {
    (void)state;
    char why[256];
    int cmd;
    unsigned bits;
    /* token length says 100 bytes but only 3 follow */
    uint8_t trunc[] = {0x1a, 100, 'a', 'b', 'c'};
    assert_int_equal(st_control_decide(trunc, sizeof trunc, job, &cmd, &bits, why, sizeof why), 0);
    assert_non_null(strstr(why, "malformed"));
    assert_int_equal(cmd, -1);
    /* wire type 7 does not exist */
    uint8_t wt[] = {0x0f, 0x00};
    assert_int_equal(st_control_decide(wt, sizeof wt, job, &cmd, &bits, why, sizeof why), 0);
    /* oversized: refused before decoding */
    uint8_t *big = calloc(ST_CONTROL_MAX_BYTES + 1, 1);
    assert_int_equal(st_control_decide(big, ST_CONTROL_MAX_BYTES + 1, job, &cmd, &bits, why, sizeof why), 0);
    assert_non_null(strstr(why, "larger than"));
    free(big);
    /* random bytes never crash and never raise a control bit without the token */
    srand(7);
    uint8_t r[64];
    for (int it = 0; it < 20000; it++) {
        size_t n = (size_t)(rand() % 64);
        for (size_t i = 0; i < n; i++) r[i] = (uint8_t)rand();
        st_control_decide(r, n, job, &cmd, &bits, why, sizeof why);
        assert_int_equal(bits, 0);
    }
    /* empty message decodes as STATUS with no token (all proto3 defaults): allowed, harmless */
    assert_int_equal(st_control_decide("", 0, job, &cmd, &bits, why, sizeof why), 1);
    assert_int_equal(cmd, 0);
}

/* ---- stalls with injected clocks ---- */

static void test_stall_silent_and_recovery(void **state) {
    (void)state;
    st_rank_state r;
    memset(&r, 0, sizeof r);
    r.rank = 3;
    r.heard_at = 100.0; /* coordinator started at t=100, nothing heard yet */
    double secs;
    assert_int_equal(st_stall_check(&r, 110.0, 30, &secs), ST_STALL_NONE);
    assert_int_equal(st_stall_check(&r, 131.0, 30, &secs), ST_STALL_SILENT);
    char text[256];
    st_stall_text(&r, ST_STALL_SILENT, secs, text, sizeof text);
    assert_non_null(strstr(text, "rank 3 has sent no heartbeat"));
    st_rank_heard(&r, "n7", 1042, ST_PHASE_COMM, 0.5, 140.0);
    assert_int_equal(st_stall_check(&r, 141.0, 30, &secs), ST_STALL_NONE);
    /* heartbeats stop at 140: silent strictly after 170 */
    assert_int_equal(st_stall_check(&r, 170.0, 30, &secs), ST_STALL_NONE);
    assert_int_equal(st_stall_check(&r, 170.5, 30, &secs), ST_STALL_SILENT);
    assert_true(secs > 30.4 && secs < 30.6);
    st_stall_text(&r, ST_STALL_SILENT, secs, text, sizeof text);
    assert_string_equal(text, "rank 3 on host n7 silent for 30 s (last seen in comm at step 1042)");
    st_rank_heard(&r, "n7", 1043, ST_PHASE_FORWARD, 0.1, 171.0);
    assert_int_equal(st_stall_check(&r, 171.2, 30, &secs), ST_STALL_NONE);
}

static void test_stall_stuck_in_phase(void **state) {
    (void)state;
    st_rank_state r;
    memset(&r, 0, sizeof r);
    r.rank = 3;
    double secs;
    /* heartbeats keep coming (telemetry thread alive) but the phase clock keeps growing */
    st_rank_heard(&r, "n7", 1042, ST_PHASE_COMM, 29.0, 500.0);
    assert_int_equal(st_stall_check(&r, 500.5, 30, &secs), ST_STALL_NONE);
    st_rank_heard(&r, "n7", 1042, ST_PHASE_COMM, 30.6, 501.6);
    assert_int_equal(st_stall_check(&r, 501.6, 30, &secs), ST_STALL_STUCK);
    char text[256];
    st_stall_text(&r, ST_STALL_STUCK, 31.0, text, sizeof text);
    assert_string_equal(text, "rank 3 on host n7 stuck in comm at step 1042 for 31 s");
    /* no extrapolation: 29 s reported 1.5 s ago is not stuck yet, and a long silence is "silent" */
    st_rank_heard(&r, "n7", 1042, ST_PHASE_COMM, 29.0, 600.0);
    assert_int_equal(st_stall_check(&r, 601.5, 30, &secs), ST_STALL_NONE);
    assert_int_equal(st_stall_check(&r, 640.0, 30, &secs), ST_STALL_SILENT);
    /* idle (paused job) is never "stuck" */
    st_rank_heard(&r, "n7", 1042, ST_PHASE_IDLE, 500.0, 700.0);
    assert_int_equal(st_stall_check(&r, 700.1, 30, &secs), ST_STALL_NONE);
}

static void test_median_and_straggler(void **state) {
    (void)state;
    double v[] = {5, 1, 3, 2, 4};
    assert_true(st_median(v, 5) == 3);
    assert_true(st_median(v, 4) == 2); /* lower median of {1,2,3,5} */
    assert_true(v[0] == 5);            /* input untouched */
    int consec[4] = {0}, raised[4] = {0}, flag[4];
    double normal[4] = {1.0, 1.1, 0.9, 1.0}, slow[4] = {1.0, 1.1, 0.9, 1.6};
    for (int step = 0; step < 4; step++) {
        st_straggler_update(slow, 4, consec, raised, flag);
        assert_int_equal(flag[3], 0);
    }
    st_straggler_update(normal, 4, consec, raised, flag); /* a normal step resets the count */
    assert_int_equal(consec[3], 0);
    for (int step = 0; step < 5; step++) {
        st_straggler_update(slow, 4, consec, raised, flag);
        assert_int_equal(flag[3], step == 4 ? 1 : 0);
        assert_int_equal(flag[0] | flag[1] | flag[2], 0);
    }
    st_straggler_update(slow, 4, consec, raised, flag); /* alert once per episode */
    assert_int_equal(flag[3], 0);
    st_straggler_update(normal, 4, consec, raised, flag);
    assert_int_equal(flag[3], -1);
    /* exactly 1.5x is not slower than 1.5x */
    double edge[2] = {1.0, 1.5};
    int c2[2] = {0}, r2[2] = {0}, f2[2];
    for (int i = 0; i < 10; i++) st_straggler_update(edge, 2, c2, r2, f2);
    assert_int_equal(r2[1], 0);
}

static void test_probe_and_names(void **state) {
    (void)state;
    st_probe p;
    st_probe_init(&p);
    st_probe_set_step(&p, 77);
    st_probe_set_phase(&p, ST_PHASE_BACKWARD);
    assert_int_equal(atomic_load(&p.step), 77);
    assert_int_equal(atomic_load(&p.phase), ST_PHASE_BACKWARD);
    assert_true(atomic_load(&p.phase_start_ns) > 0);
    for (int i = 0; i < ST_PHASE_COUNT; i++) assert_int_equal(st_phase_from_name(st_phase_name(i)), i);
    assert_string_equal(st_phase_name(99), "?");
    assert_int_equal(st_command_from_name("checkpoint"), SHARDTUNE__COMMAND__CHECKPOINT);
    assert_int_equal(st_command_from_name("resume"), SHARDTUNE__COMMAND__RESUME);
    assert_int_equal(st_command_from_name("reboot"), -1);
    assert_true(st_rss_bytes() > 0);
}


/* ---- CURVE key files ---- */

static void run_path(const char *name, char *path, size_t n) { snprintf(path, n, "%s/%s", st_test_dir, name); }

static void read_text(const char *path, char *out, size_t n) {
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t got = fread(out, 1, n - 1, f);
    out[got] = 0;
    fclose(f);
}

static void test_curve_keys_create_mode_and_read(void **state) {
    (void)state;
    assert_int_equal(st_curve_available(), 1); /* Debian's libzmq 4.3.4 has libsodium */
    char pub[ST_CURVE_KEY_BUF], sec[ST_CURVE_KEY_BUF], back[ST_CURVE_KEY_BUF], derived[ST_CURVE_KEY_BUF];
    char key_path[512], pub_path[512], from[512], text[128];
    run_path(ST_CURVE_SECRET_FILE, key_path, sizeof key_path);
    run_path(ST_CURVE_PUBLIC_FILE, pub_path, sizeof pub_path);
    umask(0); /* modes must not depend on the umask */
    assert_int_equal(st_curve_keys_create(st_test_dir, pub, sec), 0);
    umask(022);
    struct stat st;
    assert_int_equal(stat(key_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(stat(pub_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);
    /* one Z85 line each; the public key really belongs to the secret one (derived independently) */
    read_text(pub_path, text, sizeof text);
    assert_int_equal(strlen(text), ST_CURVE_KEY_LEN + 1);
    assert_memory_equal(text, pub, ST_CURVE_KEY_LEN);
    assert_int_equal(zmq_curve_public(derived, sec), 0);
    assert_string_equal(derived, pub);
    assert_int_equal(st_curve_key_read_file(key_path, 1, back), 0);
    assert_string_equal(back, sec);
    assert_int_equal(st_curve_key_read_file(pub_path, 0, back), 0);
    assert_string_equal(back, pub);
    /* clients find monitor.pub through the run directory, or take an explicit file first */
    assert_int_equal(st_curve_client_key(NULL, st_test_dir, back, from, sizeof from), 1);
    assert_string_equal(back, pub);
    assert_string_equal(from, pub_path);
    assert_int_equal(st_curve_client_key(pub_path, "/nonexistent", back, from, sizeof from), 1);
    assert_string_equal(back, pub);
    /* a new job: new keys, and whoever had the old file open keeps reading the old, complete key */
    FILE *old = fopen(pub_path, "r");
    assert_non_null(old);
    char pub2[ST_CURVE_KEY_BUF], sec2[ST_CURVE_KEY_BUF];
    assert_int_equal(st_curve_keys_create(st_test_dir, pub2, sec2), 0);
    assert_string_not_equal(pub2, pub);
    assert_string_not_equal(sec2, sec);
    assert_non_null(fgets(text, sizeof text, old));
    fclose(old);
    assert_memory_equal(text, pub, ST_CURVE_KEY_LEN);
    assert_int_equal(st_curve_key_read_file(pub_path, 0, back), 0);
    assert_string_equal(back, pub2);
    assert_int_equal(st_curve_key_read_file(key_path, 1, back), 0);
    assert_string_equal(back, sec2);
    assert_int_equal(stat(key_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    /* a job without CURVE removes them: --run-dir clients then connect plain */
    assert_int_equal(st_curve_keys_remove(st_test_dir), 0);
    assert_int_not_equal(access(key_path, F_OK), 0);
    assert_int_not_equal(access(pub_path, F_OK), 0);
    assert_int_equal(st_curve_client_key(NULL, st_test_dir, back, from, sizeof from), 0);
    assert_int_equal(st_curve_client_key(NULL, NULL, back, from, sizeof from), 0);
    assert_int_equal(st_curve_keys_remove(st_test_dir), 0); /* nothing to remove is fine */
}

static void write_text(const char *path, const char *text, mode_t mode) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    chmod(path, mode);
}

static void test_curve_key_read_refuses_bad_files(void **state) {
    (void)state;
    char pub[ST_CURVE_KEY_BUF], sec[ST_CURVE_KEY_BUF], back[ST_CURVE_KEY_BUF], key_path[512], bad[512];
    run_path(ST_CURVE_SECRET_FILE, key_path, sizeof key_path);
    run_path("bad.key", bad, sizeof bad);
    assert_int_equal(st_curve_keys_create(st_test_dir, pub, sec), 0);
    chmod(key_path, 0640); /* a secret key others can read is refused; a public one may be 0644 */
    assert_int_equal(st_curve_key_read_file(key_path, 1, back), ST_EINVAL);
    assert_non_null(strstr(st_error(), "chmod 600"));
    assert_int_equal(st_curve_key_read_file(key_path, 0, back), 0);
    char text[128];
    const char *malformed[] = {
        "",                                          /* empty */
        "short\n",                                   /* too short */
        "",                                          /* 39 chars: filled below */
        "",                                          /* 41 chars: filled below */
        "",                                          /* 40 chars with a non-Z85 character: below */
        "",                                          /* 40 chars with a space inside: below */
    };
    char k39[64], k41[64], tilde[64], space[64];
    snprintf(k39, sizeof k39, "%.39s\n", pub);
    snprintf(k41, sizeof k41, "%sA\n", pub);
    snprintf(tilde, sizeof tilde, "%s\n", pub);
    tilde[7] = '~';
    snprintf(space, sizeof space, "%s\n", pub);
    space[20] = ' ';
    malformed[2] = k39, malformed[3] = k41, malformed[4] = tilde, malformed[5] = space;
    for (int i = 0; i < 6; i++) {
        write_text(bad, malformed[i], 0644);
        assert_int_equal(st_curve_key_read_file(bad, 0, back), ST_EFORMAT);
        assert_non_null(strstr(st_error(), bad)); /* names the file ... */
        assert_null(strstr(st_error(), "~"));       /* ... never echoes the content */
        /* the client resolution refuses it the same way (a bad --server-key is an error, not plain) */
        assert_int_equal(st_curve_client_key(bad, NULL, back, text, sizeof text), ST_EFORMAT);
    }
    /* a file with a key plus trailing junk lines is refused, CRLF is accepted */
    snprintf(text, sizeof text, "%s\nextra\n", pub);
    write_text(bad, text, 0644);
    assert_int_equal(st_curve_key_read_file(bad, 0, back), ST_EFORMAT);
    snprintf(text, sizeof text, "%s\r\n", pub);
    write_text(bad, text, 0644);
    assert_int_equal(st_curve_key_read_file(bad, 0, back), 0);
    assert_string_equal(back, pub);
    /* a malformed monitor.pub in the run directory is an error too, naming it */
    char pub_path[512];
    run_path(ST_CURVE_PUBLIC_FILE, pub_path, sizeof pub_path);
    write_text(pub_path, "garbage\n", 0644);
    assert_int_equal(st_curve_client_key(NULL, st_test_dir, back, text, sizeof text), ST_EFORMAT);
    assert_non_null(strstr(st_error(), pub_path));
    assert_int_equal(st_curve_key_read_file("/nonexistent/monitor.pub", 0, back), ST_EIO);
    assert_non_null(strstr(st_error(), "/nonexistent/monitor.pub"));
    assert_int_equal(st_curve_key_read_file(st_test_dir, 0, back), ST_EINVAL); /* a directory */
    assert_int_equal(st_curve_keys_create("/nonexistent/dir", pub, sec), ST_EIO);
    assert_non_null(strstr(st_error(), "/nonexistent/dir/monitor.key"));
}

/* Sends "ping" from a REQ client (CURVE with server_key, or plain when NULL); 1 if "pong" came back. */
static int curve_ping(void *ctx, void *rep, const char *endpoint, const char *server_key) {
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int linger = 0, to = 400;
    zmq_setsockopt(req, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &to, sizeof to);
    if (server_key) assert_int_equal(st_curve_client_setup(req, server_key), 0);
    assert_int_equal(zmq_connect(req, endpoint), 0);
    zmq_send(req, "ping", 4, 0);
    int got = 0;
    zmq_pollitem_t it = {.socket = rep, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 400) == 1) {
        char buf[8];
        assert_int_equal(zmq_recv(rep, buf, sizeof buf, 0), 4);
        zmq_send(rep, "pong", 4, 0);
        char back[8];
        got = zmq_recv(req, back, sizeof back, 0) == 4 && !memcmp(back, "pong", 4);
    }
    zmq_close(req);
    return got;
}

static void test_curve_sockets(void **state) {
    (void)state;
    char pub[ST_CURVE_KEY_BUF], sec[ST_CURVE_KEY_BUF], other_pub[ST_CURVE_KEY_BUF], other_sec[ST_CURVE_KEY_BUF];
    assert_int_equal(zmq_curve_keypair(pub, sec), 0);
    assert_int_equal(zmq_curve_keypair(other_pub, other_sec), 0);
    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP);
    int linger = 0;
    zmq_setsockopt(rep, ZMQ_LINGER, &linger, sizeof linger);
    assert_int_equal(st_curve_server_setup(rep, "too-short"), ST_EINVAL);
    assert_int_equal(st_curve_server_setup(rep, sec), 0);
    assert_int_equal(zmq_bind(rep, "tcp://127.0.0.1:*"), 0);
    char endpoint[256];
    size_t sz = sizeof endpoint;
    zmq_getsockopt(rep, ZMQ_LAST_ENDPOINT, endpoint, &sz);
    assert_int_equal(curve_ping(ctx, rep, endpoint, other_pub), 0); /* an impostor's key: no handshake */
    assert_int_equal(curve_ping(ctx, rep, endpoint, NULL), 0);      /* plain client: no handshake */
    assert_int_equal(curve_ping(ctx, rep, endpoint, pub), 1);       /* the job's key: answered */
    zmq_close(rep);
    zmq_ctx_term(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_token_create_mode_and_read, st_test_dir_setup, teardown_dir),
        cmocka_unit_test_setup_teardown(test_token_read_refuses_bad_files, st_test_dir_setup, teardown_dir),
        cmocka_unit_test_setup_teardown(test_curve_keys_create_mode_and_read, st_test_dir_setup, teardown_dir),
        cmocka_unit_test_setup_teardown(test_curve_key_read_refuses_bad_files, st_test_dir_setup, teardown_dir),
        cmocka_unit_test(test_curve_sockets),
        cmocka_unit_test(test_control_tokens),
        cmocka_unit_test(test_control_hand_encoded),
        cmocka_unit_test(test_control_garbage),
        cmocka_unit_test(test_stall_silent_and_recovery),
        cmocka_unit_test(test_stall_stuck_in_phase),
        cmocka_unit_test(test_median_and_straggler),
        cmocka_unit_test(test_probe_and_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
