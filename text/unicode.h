/* unicode.h — the Unicode data the tokenizer needs: UTF-8 decoding, general category classes (for the
 * pre-tokenizer regexes' \p{L} \p{N} \s), and NFC/NFD/NFKC/NFKD normalization.
 *
 * The tables (text/unicode_tables.c) are generated from Python's unicodedata by
 * text/gen_unicode_tables.py and checked in; they are static, read-only data. */
#ifndef ST_UNICODE_H
#define ST_UNICODE_H

#include <stddef.h>
#include <stdint.h>

enum { ST_UC_CN = 0, ST_UC_L = 1, ST_UC_M = 2, ST_UC_N = 3, ST_UC_P = 4, ST_UC_S = 5, ST_UC_Z = 6, ST_UC_C = 7,
       ST_UC_PC = 8 };
enum { ST_NORM_NFC, ST_NORM_NFD, ST_NORM_NFKC, ST_NORM_NFKD };

extern const char st_uc_version[];
extern const uint32_t st_uc_cat_ranges[][3], st_uc_ccc_ranges[][3], st_uc_decomp[][5], st_uc_comp[][3];
extern const unsigned st_uc_cat_ranges_n, st_uc_ccc_ranges_n, st_uc_decomp_n, st_uc_comp_n;
extern const uint32_t st_uc_decomp_pool[];

/* Decodes one UTF-8 character at s[0..n) (n >= 1): returns its byte length and sets *cp. Invalid or
 * truncated sequences decode as one byte with *cp = 0xFFFD (input is validated before use anyway). */
int st_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);
/* Encodes cp into out (4 bytes room); returns the byte count. */
int st_utf8_encode(uint32_t cp, char *out);
/* 1 when s[0..n) is valid UTF-8 (no surrogates, no overlongs). */
int st_utf8_valid(const char *s, size_t n);

int st_uc_category(uint32_t cp); /* ST_UC_* */
static inline int st_uc_is_letter(uint32_t cp) {
    if (cp < 128) return (cp | 32) >= 'a' && (cp | 32) <= 'z';
    return st_uc_category(cp) == ST_UC_L;
}
static inline int st_uc_is_number(uint32_t cp) {
    if (cp < 128) return cp >= '0' && cp <= '9';
    return st_uc_category(cp) == ST_UC_N;
}
/* Unicode White_Space (Rust char::is_whitespace, Oniguruma's \s). */
static inline int st_uc_is_space(uint32_t cp) {
    if (cp < 128) return cp == ' ' || (cp >= 9 && cp <= 13);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}
int st_uc_ccc(uint32_t cp);

/* Normalizes UTF-8 text (form ST_NORM_*) into a malloc'ed NUL-terminated string. */
int st_uc_normalize(int form, const char *s, size_t n, char **out, size_t *out_len);

#endif
