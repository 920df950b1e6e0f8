"""ref_chat_template.py — our Jinja interpreter (tests/tools/chat_render) against transformers 5's
render_jinja_template (the renderer behind apply_chat_template) on the chat templates of Llama-2, Llama-3,
Llama-3.1 (with tools), Qwen2.5 (with tools), Qwen3 (reasoning, tool calls, enable_thinking), Mistral, Gemma,
Phi-3, Zephyr, ChatML, and a syntax template exercising the rest of the supported Jinja. Every
conversation x add_generation_prompt is compared byte for byte; when transformers raises
(raise_exception, undefined access) we must fail too, with its message. Env: ST_BUILD_DIR."""
import json
import os
import subprocess
import sys

from transformers.utils.chat_template_utils import render_jinja_template

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.environ["ST_BUILD_DIR"], "chat_render")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city — «quoted»",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def conversations():
    u, a, s = "user", "assistant", "system"
    m = lambda r, c, **kw: {"role": r, "content": c, **kw}  # noqa: E731
    return [
        [m(u, "Hello!")],
        [m(u, "Hi"), m(a, "Hello! How can I help?")],
        [m(s, "You are terse."), m(u, "2+2?"), m(a, "4"), m(u, "and 3+3?"), m(a, "6")],
        [m(u, "  padded with spaces and\nnewlines \n\n"), m(a, "\n  reply with   runs  \t")],
        [m(u, "Unicode: 中文 日本語 😀 👨‍👩‍👧 e\u0301 'quotes' \"dq\" \\ backslash {{ not jinja }} {% nor %}"), m(a, "ok ✓")],
        [m(u, ""), m(a, "")],
        [m(a, "assistant first")],
        [m(u, "one"), m(u, "two in a row")],
        [m(s, "sys only")],
        [m(u, "weather?"), m(a, "", tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
         m("tool", "{\"temp\": 21}"), m(a, "It is 21 degrees.")],
        [m(u, "think please"), m(a, "<think>\nstep one\n</think>\n\nThe answer is 42.")],
        [m(u, "q1"), m(a, "a1", reasoning_content="r1"), m(u, "q2"), m(a, "a2", reasoning_content="because")],
        [m("tool", "<tool_response>x</tool_response>")],
    ]


TEMPLATES = {
    "llama2.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama31.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen25.jinja": {"eos_token": "<|im_end|>"},
    "qwen3.jinja": {"eos_token": "<|im_end|>"},
    "mistral.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma.jinja": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi3.jinja": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "zephyr.jinja": {"eos_token": "</s>"},
    "chatml.jinja": {"eos_token": "<|im_end|>"},
    "syntax.jinja": {},
}


def reference(template, conv, agp, special, extra):
    try:
        out, _ = render_jinja_template([conv], chat_template=template, add_generation_prompt=agp,
                                       tools=extra.get("tools"), **special,
                                       **{k: v for k, v in extra.items() if k != "tools"})
        return {"text": out[0]}
    except Exception as e:  # noqa: BLE001 — any failure must be a failure on our side too
        return {"error": str(e)}


def main():
    failures = compared = 0
    for name, special in TEMPLATES.items():
        path = os.path.join(HERE, "chat_templates", name)
        template = open(path).read()
        reqs, refs = [], []
        extras = [{}]
        if name in ("llama31.jinja", "qwen25.jinja", "qwen3.jinja"):
            extras.append({"tools": TOOLS})
        if name == "qwen3.jinja":
            extras.append({"enable_thinking": False})
        if name == "llama31.jinja":
            extras.append({"tools": TOOLS, "tools_in_user_message": False, "date_string": "01 Jan 2025"})
        for conv in conversations():
            for agp in (False, True):
                for extra in extras:
                    reqs.append({"messages": conv, "add_generation_prompt": agp, **special, "extra": extra})
                    refs.append(reference(template, conv, agp, special, extra))
        p = subprocess.run([TOOL, path], input="".join(json.dumps(r) + "\n" for r in reqs), capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:
            print(f"{name}: chat_render failed: {p.stderr}")
            failures += 1
            continue
        got = [json.loads(l) for l in p.stdout.split("\n")[:-1]]
        n_err = 0
        for req, want, have in zip(reqs, refs, got):
            compared += 1
            if "error" in want:
                n_err += 1
                ok = "error" in have
                if ok and "raise_exception" in template and "undefined" not in want["error"]:
                    ok = want["error"] in have["error"] or "undefined" in have["error"]
            else:
                ok = have == want
            if not ok:
                failures += 1
                if failures <= 12:
                    print(f"{name} agp={req['add_generation_prompt']} extra={list(req['extra'])} conv={req['messages']}\n"
                          f"  want {want!r}\n  got  {have!r}")
        print(f"{name}: {len(reqs)} renderings compared ({n_err} expected errors)")
    # unsupported constructs are named with their line
    bad = {"{% macro f() %}x{% endmacro %}": "macro", "{{ x|wordwrap }}": "wordwrap", "\n\n{% include 'x' %}": "line 3"}
    for src, words in bad.items():
        p = os.path.join(os.environ["ST_BUILD_DIR"], "bad.jinja")
        open(p, "w").write(src)
        r = subprocess.run([TOOL, p], input=json.dumps({"messages": []}) + "\n", capture_output=True, text=True)
        out = json.loads(r.stdout)
        if words not in out.get("error", ""):
            print(f"expected an error naming {words!r} for {src!r}, got {out}")
            failures += 1
    if failures:
        print(f"FAIL: {failures} of {compared}")
        sys.exit(1)
    print(f"ok: {compared} renderings")


if __name__ == "__main__":
    main()
