/* pretok.c — the pre-tokenizer split regexes of GPT-2, Llama-3 and Qwen2, as hand-written matchers.
 *
 * Each function reproduces, at one position, what Oniguruma's leftmost backtracking search does for the
 * pattern: alternatives are tried in order and the first that matches wins; greedy quantifiers give
 * back only as far as a later part of the same alternative needs. The patterns (verbatim in
 * tokenizer_load.c) cover every code point, so a match always starts where the previous one ended.
 * tests/reference/ref_tokenizer.py compares the results with `tokenizers` on a hard multilingual set. */
#include "text/tok_internal.h"
#include "text/unicode.h"

#define L(c) st_uc_is_letter(c)
#define N(c) st_uc_is_number(c)
#define S(c) st_uc_is_space(c)
#define OTHER(c) (!S(c) && !L(c) && !N(c))
#define CRLF(c) ((c) == '\r' || (c) == '\n')

/* 's 't 're 've 'm 'll 'd, optionally case-insensitive (Unicode simple case folding: s also matches
 * U+017F LATIN SMALL LETTER LONG S; the other letters fold only to their ASCII pair). */
static size_t contraction(const uint32_t *c, size_t n, size_t i, int icase) {
    if (c[i] != '\'' || i + 1 >= n) return 0;
    uint32_t a = c[i + 1], b = i + 2 < n ? c[i + 2] : 0;
    if (icase) {
        if (a == 0x17F) a = 's';
        if (a < 128) a |= 32;
        if (b == 0x17F) b = 's';
        if (b < 128 && b) b |= 32;
        if (a >= 128) return 0;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' || a == 'v') && b == 'e') return 3;
    if (a == 'l' && b == 'l') return 3;
    return 0;
}

/* \s+(?!\S) then \s+ : a whitespace run, less its last character when a non-space follows it. */
static size_t space_run(const uint32_t *c, size_t n, size_t i) {
    size_t k = i;
    while (k < n && S(c[k])) k++;
    if (k == i) return 0;
    if (k == n || k - i == 1) return k - i;
    return k - i - 1;
}

static size_t gpt2(const uint32_t *c, size_t n, size_t i) {
    size_t m = contraction(c, n, i, 0);
    if (m) return m;
    size_t j = i + (c[i] == ' ' && i + 1 < n);
    if (L(c[j])) { while (j < n && L(c[j])) j++; return j - i; }
    if (N(c[j])) { while (j < n && N(c[j])) j++; return j - i; }
    if (OTHER(c[j])) { while (j < n && OTHER(c[j])) j++; return j - i; }
    return space_run(c, n, i);
}

static size_t llama3(const uint32_t *c, size_t n, size_t i, int max_digits) {
    size_t m = contraction(c, n, i, 1);
    if (m) return m;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    size_t j = i;
    if (!CRLF(c[j]) && !L(c[j]) && !N(c[j]) && j + 1 < n && L(c[j + 1])) j++;
    if (L(c[j])) { while (j < n && L(c[j])) j++; return j - i; }
    /* \p{N}{1,3} or \p{N} */
    if (N(c[i])) { j = i; while (j < n && N(c[j]) && (int)(j - i) < max_digits) j++; return j - i; }
    /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    j = i + (c[i] == ' ' && i + 1 < n);
    if (OTHER(c[j])) {
        while (j < n && OTHER(c[j])) j++;
        while (j < n && CRLF(c[j])) j++;
        return j - i;
    }
    /* \s*[\r\n]+ : up to and including the run's last CR/LF */
    size_t k = i, last = n;
    while (k < n && S(c[k])) { if (CRLF(c[k])) last = k; k++; }
    if (last != n) return last + 1 - i;
    return space_run(c, n, i);
}

size_t st_pretok_match(int regex, const uint32_t *cps, size_t n, size_t i) {
    switch (regex) {
    case PRE_RE_GPT2: return gpt2(cps, n, i);
    case PRE_RE_LLAMA3: return llama3(cps, n, i, 3);
    default: return llama3(cps, n, i, 1);
    }
}
