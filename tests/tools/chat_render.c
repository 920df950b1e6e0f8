/* chat_render.c — test helper: renders a chat template for each request on stdin.
 * usage: chat_render TEMPLATE_FILE < requests.jsonl
 * Request: {"messages": [...], "add_generation_prompt": bool, "bos_token": s, "eos_token": s, "extra": {...}}.
 * Output, one line per request: {"text": "..."} or {"error": "..."}. */
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: chat_render TEMPLATE_FILE < requests.jsonl\n"); return 2; }
    char *tpl = NULL;
    size_t tlen = 0;
    if (st_read_file(argv[1], &tpl, &tlen) < 0) { fprintf(stderr, "%s\n", st_error()); return 1; }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        st_json *req = NULL;
        if (st_json_parse(line, (size_t)len, &req) < 0) { fprintf(stderr, "bad request: %s\n", st_error()); return 1; }
        const st_json *agp = st_json_get(req, "add_generation_prompt");
        st_chat_opts o = {st_json_get_string(req, "bos_token", NULL), st_json_get_string(req, "eos_token", NULL),
                          agp && agp->type == ST_JSON_BOOL && agp->boolean, st_json_get(req, "extra")};
        char *out = NULL;
        st_strbuf b = {0};
        if (st_chat_render(tpl, st_json_get(req, "messages"), &o, &out) == 0) {
            st_strbuf_append(&b, "{\"text\": ", 9);
            st_strbuf_json_string(&b, out);
        } else {
            st_strbuf_append(&b, "{\"error\": ", 10);
            st_strbuf_json_string(&b, st_error());
        }
        st_strbuf_append(&b, "}\n", 2);
        fwrite(b.data, 1, b.len, stdout);
        st_strbuf_free(&b);
        free(out);
        st_json_free(req);
    }
    free(line);
    free(tpl);
    return 0;
}
