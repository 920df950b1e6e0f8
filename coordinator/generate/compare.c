/* compare.c — the library side of `shardtune compare` (see compare.h): DIR/sheet.html and DIR/key.json
 * of `compare sheet`, and the unblinded score of `compare score`.
 *
 * The page is one file with its style and script inline: it works offline and from file://. The items
 * travel as a JSON document inside <script type="application/json">, with every '<', '>' and '&' written
 * as a \u escape, so no answer text can close the script element; the script puts text on the page only
 * through textContent, never as HTML. Votes live in the page (and in localStorage, so a reload keeps
 * them) and are saved as votes.jsonl through a download; the same lines are shown in a text box too. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"
#include "common/rng.h"
#include "common/util.h"
#include "coordinator/generate/compare.h"
#include "coordinator/generate/gen_run.h"

char st_sheet_tuned_side(uint64_t seed, int i) {
    st_rng r;
    st_rng_seed(&r, seed ^ 0x5eed5eedULL, (uint64_t)i);
    return (st_rng_u64(&r) >> 63) ? 'A' : 'B';
}

static const char *PAGE_HEAD =
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    "<title>shardtune: which answer is better?</title>\n<style>\n"
    "body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}\n"
    "header{background:#26323f;color:#fff;padding:10px 20px;display:flex;justify-content:space-between;align-items:center}\n"
    "header h1{font-size:18px;margin:0}\n#progress{font-size:15px}\n"
    "#bar{height:5px;background:#ddd}#bar div{height:5px;background:#3c8d5a;width:0}\n"
    "main{max-width:1200px;margin:0 auto;padding:12px 20px}\n"
    "pre{white-space:pre-wrap;word-wrap:break-word;font-family:inherit;font-size:15px;margin:0}\n"
    ".box{background:#fff;border:1px solid #ccc;border-radius:6px;padding:12px;margin:10px 0}\n"
    ".answers{display:flex;gap:14px}.answers .box{flex:1}\n"
    ".box h2{font-size:14px;margin:0 0 8px 0;color:#555}\n"
    ".chosen{border:3px solid #3c8d5a}\n"
    "button{font-size:15px;padding:8px 14px;margin:4px;border-radius:5px;border:1px solid #888;background:#fff;cursor:pointer}\n"
    "button:hover{background:#eef}\n#status{color:#555}\n"
    "textarea{width:100%;height:90px;font-family:monospace;font-size:12px}\n"
    "kbd{border:1px solid #aaa;border-radius:3px;padding:0 4px;background:#eee}\n"
    "</style>\n</head>\n<body>\n"
    "<header><h1>Which answer is better? (blind comparison)</h1><div id=\"progress\"></div></header>\n"
    "<div id=\"bar\"><div></div></div>\n<main>\n"
    "<p>Read the prompt and both answers, then vote: <kbd>A</kbd> answer A is better, <kbd>B</kbd> answer B is "
    "better, <kbd>T</kbd> tie. <kbd>&larr;</kbd>/<kbd>&rarr;</kbd> move between prompts, <kbd>S</kbd> saves your "
    "votes as <code>votes.jsonl</code> (also shown below). Votes are kept in this browser if you reload.</p>\n"
    "<div class=\"box\"><h2>Prompt <span id=\"pos\"></span> &middot; id <span id=\"pid\"></span></h2>"
    "<pre id=\"prompt\"></pre></div>\n"
    "<div class=\"answers\"><div class=\"box\" id=\"box-a\"><h2>Answer A</h2><pre id=\"answer-a\"></pre></div>\n"
    "<div class=\"box\" id=\"box-b\"><h2>Answer B</h2><pre id=\"answer-b\"></pre></div></div>\n"
    "<div><button id=\"vote-a\">A is better (A)</button><button id=\"vote-t\">Tie (T)</button>"
    "<button id=\"vote-b\">B is better (B)</button> &nbsp; <button id=\"prev\">&larr; Previous</button>"
    "<button id=\"next\">Next &rarr;</button> &nbsp; <button id=\"save\">Save votes (S)</button></div>\n"
    "<p id=\"status\"></p>\n<textarea id=\"votes-jsonl\" readonly></textarea>\n</main>\n"
    "<script type=\"application/json\" id=\"sheet-data\">";

static const char *PAGE_TAIL =
    "</script>\n<script>\n(function () {\n"
    "  'use strict';\n"
    "  var data = JSON.parse(document.getElementById('sheet-data').textContent);\n"
    "  var items = data.items, votes = {}, cur = 0, store = 'shardtune-votes-' + data.sheet;\n"
    "  try { votes = JSON.parse(window.localStorage.getItem(store)) || {}; } catch (e) { votes = {}; }\n"
    "  function $(id) { return document.getElementById(id); }\n"
    "  function count() { var n = 0; items.forEach(function (it) { if (votes[it.id]) n++; }); return n; }\n"
    "  function jsonl() {\n"
    "    return items.filter(function (it) { return votes[it.id]; }).map(function (it) {\n"
    "      return JSON.stringify({id: it.id, vote: votes[it.id]}) + '\\n'; }).join('');\n"
    "  }\n"
    "  function show() {\n"
    "    var it = items[cur], v = votes[it.id], n = count();\n"
    "    $('pos').textContent = (cur + 1) + ' of ' + items.length;\n"
    "    $('pid').textContent = it.id;\n"
    "    $('prompt').textContent = it.prompt;\n"
    "    $('answer-a').textContent = it.a;\n"
    "    $('answer-b').textContent = it.b;\n"
    "    $('box-a').className = 'box' + (v === 'A' ? ' chosen' : '');\n"
    "    $('box-b').className = 'box' + (v === 'B' ? ' chosen' : '');\n"
    "    $('progress').textContent = n + ' / ' + items.length + ' voted';\n"
    "    $('bar').firstChild.style.width = (100 * n / items.length) + '%';\n"
    "    $('status').textContent = v ? 'Your vote here: ' + (v === 'tie' ? 'tie' : v + ' is better') :\n"
    "      (n === items.length ? 'All prompts voted: press S to save.' : 'Not voted yet.');\n"
    "    $('votes-jsonl').value = jsonl();\n"
    "  }\n"
    "  function persist() { try { window.localStorage.setItem(store, JSON.stringify(votes)); } catch (e) {} }\n"
    "  function vote(v) {\n"
    "    votes[items[cur].id] = v; persist();\n"
    "    if (cur + 1 < items.length) cur++;\n"
    "    show();\n"
    "  }\n"
    "  function move(d) { cur = Math.min(items.length - 1, Math.max(0, cur + d)); show(); }\n"
    "  function save() {\n"
    "    var text = jsonl(), blob = new Blob([text], {type: 'application/x-ndjson'});\n"
    "    var a = document.createElement('a');\n"
    "    a.href = URL.createObjectURL(blob); a.download = 'votes.jsonl';\n"
    "    document.body.appendChild(a); a.click(); document.body.removeChild(a);\n"
    "    $('votes-jsonl').value = text;\n"
    "    $('status').textContent = 'Saved ' + count() + ' votes as votes.jsonl.';\n"
    "  }\n"
    "  $('vote-a').onclick = function () { vote('A'); };\n"
    "  $('vote-b').onclick = function () { vote('B'); };\n"
    "  $('vote-t').onclick = function () { vote('tie'); };\n"
    "  $('prev').onclick = function () { move(-1); };\n"
    "  $('next').onclick = function () { move(1); };\n"
    "  $('save').onclick = save;\n"
    "  document.addEventListener('keydown', function (e) {\n"
    "    if (e.ctrlKey || e.metaKey || e.altKey) return;\n"
    "    var k = e.key.length === 1 ? e.key.toLowerCase() : e.key;\n"
    "    if (k === 'a') vote('A'); else if (k === 'b') vote('B'); else if (k === 't') vote('tie');\n"
    "    else if (k === 'ArrowLeft') move(-1); else if (k === 'ArrowRight') move(1);\n"
    "    else if (k === 's') save(); else return;\n"
    "    e.preventDefault();\n"
    "  });\n"
    "  window.shardtuneVotes = jsonl;\n"
    "  show();\n"
    "})();\n</script>\n</body>\n</html>\n";

/* Appends s as a JSON string that is also safe inside an HTML script element. */
static void html_safe_json_string(st_strbuf *b, const char *s) {
    st_strbuf tmp = {0};
    st_strbuf_json_string(&tmp, s);
    for (size_t i = 0; i < tmp.len; i++) {
        char c = tmp.data[i];
        if (c == '<') st_strbuf_append(b, "\\u003c", 6);
        else if (c == '>') st_strbuf_append(b, "\\u003e", 6);
        else if (c == '&') st_strbuf_append(b, "\\u0026", 6);
        else st_strbuf_append(b, &c, 1);
    }
    if (tmp.failed) b->failed = 1;
    st_strbuf_free(&tmp);
}

int st_sheet_write(const char *dir, const st_sheet_item *items, int n, uint64_t seed) {
    int rc = st_mkdirs(dir);
    if (rc) return rc;
    st_strbuf page = {0}, key = {0};
    uint64_t h = ST_FNV_INIT;
    for (int i = 0; i < n; i++) {
        h = st_fnv1a(h, items[i].id, strlen(items[i].id) + 1);
        h = st_fnv1a(h, items[i].prompt, strlen(items[i].prompt) + 1);
    }
    st_strbuf_append(&page, PAGE_HEAD, strlen(PAGE_HEAD));
    st_strbuf_printf(&page, "{\"sheet\": \"%016llx%016llx\", \"items\": [\n", (unsigned long long)h,
                     (unsigned long long)seed);
    st_strbuf_printf(&key, "{");
    for (int i = 0; i < n; i++) {
        char side = st_sheet_tuned_side(seed, i);
        const char *a = side == 'A' ? items[i].tuned : items[i].base;
        const char *b = side == 'A' ? items[i].base : items[i].tuned;
        st_strbuf_printf(&page, "%s{\"id\": ", i ? ",\n" : "");
        html_safe_json_string(&page, items[i].id);
        st_strbuf_printf(&page, ", \"prompt\": ");
        html_safe_json_string(&page, items[i].prompt);
        st_strbuf_printf(&page, ", \"a\": ");
        html_safe_json_string(&page, a);
        st_strbuf_printf(&page, ", \"b\": ");
        html_safe_json_string(&page, b);
        st_strbuf_printf(&page, "}");
        st_strbuf_printf(&key, "%s\n  ", i ? "," : "");
        st_strbuf_json_string(&key, items[i].id);
        st_strbuf_printf(&key, ": \"%c\"", side);
    }
    st_strbuf_printf(&page, "\n]}");
    st_strbuf_append(&page, PAGE_TAIL, strlen(PAGE_TAIL));
    st_strbuf_printf(&key, "\n}\n");
    char path[4096];
    if (page.failed || key.failed) rc = st_fail(ST_ENOMEM, "out of memory writing the comparison sheet");
    if (!rc) {
        snprintf(path, sizeof path, "%s/key.json", dir);
        rc = st_write_file_atomic(path, key.data, key.len);
    }
    if (!rc) {
        snprintf(path, sizeof path, "%s/sheet.html", dir);
        rc = st_write_file_atomic(path, page.data, page.len);
    }
    st_strbuf_free(&page);
    st_strbuf_free(&key);
    return rc;
}

/* ---------------- score ---------------- */

const char *st_compare_band(double support) {
    if (fabs(support - 0.5) <= ST_COMPARE_NEAR_HALF + 1e-12) return /* 49.5% and 50.5% both inside */ "no real progress";
    if (support < 0.5) return "worse than the base";
    if (support < 0.7) return "not good enough";
    if (support <= 0.8) return "successful";
    return "clear improvement";
}

void st_wilson95(int wins, int n, double *lo, double *hi) {
    const double z = 1.959963984540054; /* the 97.5% quantile of the standard normal */
    if (n <= 0) { *lo = 0; *hi = 1; return; }
    double p = (double)wins / n, z2 = z * z, den = 1 + z2 / n;
    double center = (p + z2 / (2.0 * n)) / den;
    double half = z * sqrt(p * (1 - p) / n + z2 / (4.0 * n * n)) / den;
    *lo = center - half < 0 ? 0 : center - half;
    *hi = center + half > 1 ? 1 : center + half;
}

/* key.json: {"<id>": "A" | "B"} (the side of the tuned answer). */
static int read_key(const char *dir, st_json **key) {
    char path[4096], *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/key.json", dir);
    int rc = st_read_file(path, &text, &len);
    if (!rc) rc = st_json_parse(text, len, key);
    free(text);
    if (rc) return st_fail_context(rc, "%s", path);
    if ((*key)->type != ST_JSON_OBJECT) rc = ST_EFORMAT;
    for (size_t i = 0; !rc && i < (*key)->count; i++) {
        const st_json *v = (*key)->items[i];
        if (v->type != ST_JSON_STRING || (strcmp(v->string, "A") && strcmp(v->string, "B"))) rc = ST_EFORMAT;
    }
    if (rc) {
        st_json_free(*key);
        *key = NULL;
        return st_fail(rc, "%s: must be an object {\"<id>\": \"A\" | \"B\"}", path);
    }
    return 0;
}

int st_compare_score(const char *dir, const char *votes_path, st_compare_result *r) {
    memset(r, 0, sizeof *r);
    st_json *key = NULL;
    int rc = read_key(dir, &key);
    if (rc) return rc;
    char *text = NULL;
    size_t len = 0;
    rc = st_read_file(votes_path, &text, &len);
    /* the last vote of an id counts (a person may change their mind); index into key->items */
    char *vote = key ? calloc(key->count + 1, 1) : NULL;
    if (!rc && !vote) rc = st_fail(ST_ENOMEM, "out of memory");
    long ln = -1;
    char *cur = text, *line = NULL;
    size_t n = 0;
    while (!rc && cur && st_jsonl_next(&cur, text + len, &ln, &line, &n)) {
        st_json *v = NULL;
        rc = st_json_parse(line, n, &v);
        if (rc) { st_fail_context(rc, "%s line %ld", votes_path, ln + 1); break; }
        const char *id = st_json_get_string(v, "id", NULL), *choice = st_json_get_string(v, "vote", NULL);
        size_t k = 0;
        while (id && k < key->count && strcmp(key->keys[k], id)) k++;
        if (!id || !choice)
            rc = st_fail(ST_EFORMAT, "%s line %ld: a vote is {\"id\": \"<id>\", \"vote\": \"A\" | \"B\" | \"tie\"}",
                         votes_path, ln + 1);
        else if (k == key->count)
            rc = st_fail(ST_EINVAL, "%s line %ld: id \"%s\" is not in %s/key.json (votes of another sheet?)",
                         votes_path, ln + 1, id, dir);
        else if (!strcmp(choice, "A") || !strcmp(choice, "B") || !strcmp(choice, "tie")) {
            if (vote[k]) r->superseded++; /* an earlier vote of this id no longer counts */
            vote[k] = choice[0];
        }
        else
            rc = st_fail(ST_EINVAL, "%s line %ld: vote \"%s\" is not A, B or tie", votes_path, ln + 1, choice);
        st_json_free(v);
    }
    for (size_t k = 0; !rc && k < key->count; k++) {
        if (!vote[k]) continue;
        if (vote[k] == 't') r->ties++;
        else if (vote[k] == key->items[k]->string[0]) r->wins++;
        else r->losses++;
    }
    if (!rc && r->wins + r->losses == 0)
        rc = st_fail(ST_EINVAL, "%s: no decided votes (%d ties): the support rate is undefined", votes_path, r->ties);
    if (!rc) {
        r->support = (double)r->wins / (r->wins + r->losses);
        st_wilson95(r->wins, r->wins + r->losses, &r->lo, &r->hi);
        r->band = st_compare_band(r->support);
    }
    free(vote);
    free(text);
    st_json_free(key);
    return rc;
}
