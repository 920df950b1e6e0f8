/* test_json.c — the JSON reader accepts valid documents, rejects malformed ones with an offset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"

static st_json *parse_ok(const char *s) {
    st_json *v = NULL;
    assert_int_equal(st_json_parse(s, strlen(s), &v), 0);
    assert_non_null(v);
    return v;
}

static void test_values(void **state) {
    (void)state;
    st_json *v = parse_ok(" {\"a\": [1, -2.5e1, true, null, \"x\\u00e9\\n\"], \"big\": 9007199254740993} ");
    const st_json *a = st_json_get(v, "a");
    assert_non_null(a);
    assert_int_equal(a->type, ST_JSON_ARRAY);
    assert_int_equal(a->count, 5);
    assert_true(a->items[0]->is_integer);
    assert_int_equal(a->items[0]->integer, 1);
    assert_true(a->items[1]->number == -25.0);
    assert_false(a->items[1]->is_integer);
    assert_int_equal(a->items[2]->boolean, 1);
    assert_int_equal(a->items[3]->type, ST_JSON_NULL);
    assert_string_equal(a->items[4]->string, "x\xc3\xa9\n");
    assert_int_equal(st_json_get_int(v, "big", 0, NULL), 9007199254740993LL);
    int ok = 1;
    assert_int_equal(st_json_get_int(v, "a", 7, &ok), 7);
    assert_int_equal(ok, 0);
    st_json_free(v);
}

static void test_errors(void **state) {
    (void)state;
    const char *bad[] = {"", "{", "[1,]", "{\"a\" 1}", "01", "1.", "\"abc", "[1] x", "tru", "\"\\ud800\"",
                         "{\"a\":}", "-", "\"\x01\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        st_json *v = (st_json *)1;
        assert_int_equal(st_json_parse(bad[i], strlen(bad[i]), &v), ST_EFORMAT);
        assert_null(v);
        assert_non_null(strstr(st_error(), "invalid JSON at byte"));
    }
    char deep[200];
    memset(deep, '[', sizeof deep);
    st_json *v;
    assert_int_equal(st_json_parse(deep, sizeof deep, &v), ST_EFORMAT);
    assert_non_null(strstr(st_error(), "too deep"));
}

static void test_strbuf(void **state) {
    (void)state;
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\"k\":%d,", 42);
    st_strbuf_json_string(&b, "q\"\\\n");
    st_strbuf_append(&b, "}", 1);
    assert_string_equal(b.data, "{\"k\":42,\"q\\\"\\\\\\n\"}");
    st_json *v = parse_ok("[\"q\\\"\\\\\\n\"]");
    assert_string_equal(v->items[0]->string, "q\"\\\n");
    st_json_free(v);
    st_strbuf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_strbuf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
