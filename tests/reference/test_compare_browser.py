"""test_compare_browser.py — `shardtune compare sheet` / `compare score`: the voting page in a real
headless browser (Debian's chromium + chromedriver through selenium), and the score math against
independently computed Wilson intervals and a hand-worked example.

 1. sheet from two models: the page's answers, unblinded with key.json, are exactly what `generate`
    writes for each model; both sides hold the tuned answer for some prompts (the shuffle is real); 2 ranks
    (mpirun) write the same sheet and key as 1 rank.
 2. the page is self-contained (no src/href/url/@import, no resource loaded), answers with <script>,
    <img onerror> and & are shown as text and nothing runs; keys A / B / T vote and move on, the
    progress counter follows, ArrowLeft goes back and a new vote replaces the old one, S saves
    votes.jsonl through a download, which equals the page's own vote list.
 3. `compare score` on the downloaded votes: wins/losses/ties counted here from the plan, support and
    the 95% Wilson interval computed here (and the 8-of-10 textbook example: [0.490, 0.943]), band
    "successful"; bands across the scale; errors (unknown id, no decided vote) are one line.
Env (set by ctest): SHARDTUNE_BIN."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def run(args, ok=True):
    r = subprocess.run([BIN, *args], capture_output=True, text=True, env=ENV, timeout=300)
    if ok:
        assert r.returncode == 0, f"shardtune {' '.join(args[:2])} failed: {r.stderr}"
    return r


def wilson(w, n, z=1.959963984540054):
    """Wilson score interval, written from its definition: the p solving |p_hat - p| = z sqrt(p(1-p)/n)."""
    p = w / n
    a = 1 + z * z / n
    b = -(2 * p + z * z / n)
    c = p * p
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


def jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def sheet_items(html):
    m = re.search(r'<script type="application/json" id="sheet-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))["items"]


def check_models_sheet(tmp):
    base, tuned = os.path.join(tmp, "base"), os.path.join(tmp, "tuned")
    for d, seed in ((base, "1"), (tuned, "2")):
        run(["init-model", "--family", "llama", "--layers", "1", "--dim", "32", "--heads", "4", "--kv-heads", "2",
             "--ffn", "48", "--vocab", "64", "--max-seq", "64", "--seed", seed, "--out", d])
    prompts = os.path.join(tmp, "mp.jsonl")
    with open(prompts, "w") as f:
        for i in range(16):
            f.write(json.dumps({"input_ids": [(i * 7 + k) % 64 for k in range(3 + i % 5)]}) + "\n")
    out = os.path.join(tmp, "msheet")
    run(["compare", "sheet", "--base", base, "--tuned", tuned, "--prompts", prompts, "--out", out, "--max-new", "8"])
    gb, gt = os.path.join(tmp, "gb.jsonl"), os.path.join(tmp, "gt.jsonl")
    for d, o in ((base, gb), (tuned, gt)):
        run(["generate", "--model", d, "--prompts", prompts, "--out", o, "--max-new", "8"])
    key = json.load(open(os.path.join(out, "key.json")))
    items = sheet_items(open(os.path.join(out, "sheet.html")).read())
    want_b = [" ".join(map(str, o["output_ids"])) for o in jsonl(gb)]
    want_t = [" ".join(map(str, o["output_ids"])) for o in jsonl(gt)]
    bad = []
    for i, it in enumerate(items):
        t, b = (it["a"], it["b"]) if key[it["id"]] == "A" else (it["b"], it["a"])
        if it["id"] != str(i) or t != want_t[i] or b != want_b[i]:
            bad.append(i)
    sides = sorted(set(key.values()))
    check("sheet from models: unblinded answers = generate", not bad and len(items) == 16 and len(key) == 16,
          f"16 prompts, ids 0..15; mismatches {bad}")
    check("sides shuffled", sides == ["A", "B"], f"tuned on A for {sum(v == 'A' for v in key.values())} of 16")
    out2 = os.path.join(tmp, "msheet2")
    r = subprocess.run(["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "2", BIN, "compare", "sheet", "--base",
                        base, "--tuned", tuned, "--prompts", prompts, "--out", out2, "--max-new", "8", "--batch", "3"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    same = r.returncode == 0 and all(open(os.path.join(out, f), "rb").read() == open(os.path.join(out2, f), "rb").read()
                                     for f in ("sheet.html", "key.json"))
    check("sheet on 2 ranks = 1 rank", same, "sheet.html and key.json byte-identical" if same else r.stderr[-300:])


EVIL = '<script>window.pwned = 1;</script><img src="x" onerror="window.pwned = 2"> & </textarea> "quoted"'


def make_text_sheet(tmp, n):
    prompts, ba, ta = (os.path.join(tmp, x) for x in ("tp.jsonl", "ba.jsonl", "ta.jsonl"))
    with open(prompts, "w") as fp, open(ba, "w") as fb, open(ta, "w") as ft:
        for i in range(n):
            pid = f"q{i}" if i != 3 else "q<3>&"
            fp.write(json.dumps({"id": pid, "prompt": f"Question {i}: <b>bold?</b>", "input_ids": [1, 2]}) + "\n")
            fb.write(json.dumps({"id": pid, "output": f"base answer {i}" + (EVIL if i == 2 else "")}) + "\n")
            ft.write(json.dumps({"id": pid, "output": f"tuned answer {i}\nsecond line" + (EVIL if i == 1 else "")}) + "\n")
    out = os.path.join(tmp, "tsheet")
    run(["compare", "sheet", "--prompts", prompts, "--base-answers", ba, "--tuned-answers", ta, "--out", out,
         "--seed", "99"])
    return out


def browser(download_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": download_dir,
                                           "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def check_page(tmp, out, n):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    html = open(os.path.join(out, "sheet.html")).read()
    external = re.findall(r'(?:\b(?:src|href)\s*=\s*["\']|url\(|@import|https?://|<link|<iframe)', html.split('id="sheet-data"')[0] +
                          html.split("</script>", 1)[1])
    check("page has no external references", not external, f"found {external}" if external else "none")
    key = json.load(open(os.path.join(out, "key.json")))
    dl = os.path.join(tmp, "downloads")
    os.makedirs(dl)
    d = browser(dl)
    try:
        d.get("file://" + os.path.join(out, "sheet.html"))
        loaded = d.execute_script("return performance.getEntriesByType('resource').length")
        check("no resource loaded", loaded == 0, f"{loaded} resources")
        keys = ActionChains(d)

        def press(k):
            ActionChains(d).send_keys(k).perform()

        def text(i):
            return d.find_element(By.ID, i).text

        # plan: the tuned side wins 8, loses 2, ties 2 (prompt 0 first voted wrong, then corrected)
        outcome = ["tuned"] * 8 + ["base"] * 2 + ["tie"] * 2
        plan = {}
        ids = [f"q{i}" if i != 3 else "q<3>&" for i in range(n)]
        progress_ok, evil_ok = True, True
        for i, pid in enumerate(ids):
            shown = d.execute_script("return document.getElementById('pid').textContent")
            if shown != pid:
                progress_ok = False
            if i in (1, 2):  # the EVIL answer is on the page as text
                a = d.execute_script("return document.getElementById('answer-a').textContent")
                b = d.execute_script("return document.getElementById('answer-b').textContent")
                evil_ok &= EVIL in a + b
            o = outcome[i]
            v = "tie" if o == "tie" else (key[pid] if o == "tuned" else ("B" if key[pid] == "A" else "A"))
            plan[pid] = v
            if i == 0:  # a wrong first vote, then back and vote again
                wrong = "t" if v != "tie" else "a"
                press(wrong)
                press(Keys.ARROW_LEFT)
            press({"A": "a", "B": "b", "tie": "t"}[v])
            if not text("progress").startswith(f"{i + 1} / {n} voted"):
                progress_ok = False
        check("keys A/B/T vote and advance, progress follows", progress_ok, text("progress"))
        pwned = d.execute_script("return window.pwned === undefined ? 'no' : String(window.pwned)")
        imgs = len(d.find_elements(By.TAG_NAME, "img"))
        check("answers are escaped (shown as text, nothing runs)", evil_ok and pwned == "no" and imgs == 0,
              f"script ran: {pwned}, <img> elements: {imgs}, text shown: {evil_ok}")
        page_votes = d.execute_script("return window.shardtuneVotes()")
        press("s")
        path = os.path.join(dl, "votes.jsonl")
        for _ in range(100):
            if os.path.exists(path) and os.path.getsize(path) > 0:
                break
            time.sleep(0.1)
        saved = open(path).read() if os.path.exists(path) else ""
        box = d.find_element(By.ID, "votes-jsonl").get_attribute("value")
        del keys
    finally:
        d.quit()
    got = {v["id"]: v["vote"] for v in (json.loads(x) for x in saved.splitlines() if x.strip())}
    check("S downloads votes.jsonl = the plan", got == plan and saved == page_votes == box,
          f"{len(got)} votes, equal to the plan: {got == plan}, to the page's list: {saved == page_votes == box}")
    return path, outcome


def check_score(tmp, out, votes, outcome):
    r = json.loads(run(["compare", "score", out, "--votes", votes, "--json"]).stdout)
    w, l, t = outcome.count("tuned"), outcome.count("base"), outcome.count("tie")
    lo, hi = wilson(w, w + l)
    ok = (r["wins"], r["losses"], r["ties"]) == (w, l, t) and abs(r["support"] - w / (w + l)) < 1e-6 and \
        abs(r["ci"][0] - lo) < 1e-5 and abs(r["ci"][1] - hi) < 1e-5 and r["band"] == "successful"
    check("score of the browser votes", ok and set(r) == {"support", "ci", "wins", "losses", "ties", "band"},
          f"{r}; expected {w}/{l}/{t}, ci [{lo:.6f}, {hi:.6f}]")
    # the textbook example: 8 of 10 -> Wilson [0.490, 0.943]
    check("hand-worked Wilson 8/10", abs(r["ci"][0] - 0.490) < 5e-4 and abs(r["ci"][1] - 0.943) < 5e-4,
          f"{r['ci']}")
    text = run(["compare", "score", out, "--votes", votes]).stdout
    check("text report", "80.0%" in text and "successful" in text and "2 ties" in text, text.replace("\n", " | "))
    # bands across the scale, on a key written here
    d = os.path.join(tmp, "bands")
    os.makedirs(d)
    bands = {0.3: "worse than the base", 0.5: "no real progress", 0.6: "not good enough", 0.75: "successful",
             0.85: "clear improvement", 0.2: "worse than the base"}
    n = 20
    with open(os.path.join(d, "key.json"), "w") as f:
        json.dump({str(i): "AB"[i % 2] for i in range(n)}, f)
    bad = []
    for s, want in bands.items():
        wins = round(s * n)
        with open(os.path.join(d, "v.jsonl"), "w") as f:
            for i in range(n):
                side = "AB"[i % 2]
                f.write(json.dumps({"id": str(i), "vote": side if i < wins else "AB"[(i + 1) % 2]}) + "\n")
        r = json.loads(run(["compare", "score", d, "--votes", os.path.join(d, "v.jsonl"), "--json"]).stdout)
        lo, hi = wilson(wins, n)
        if r["band"] != want or abs(r["ci"][0] - lo) > 1e-5 or abs(r["ci"][1] - hi) > 1e-5:
            bad.append((s, r))
    check("bands and intervals across the scale", not bad, f"{len(bands)} rates" if not bad else str(bad))
    for text, needle in (('{"id": "nope", "vote": "A"}\n', "not in"), ('{"id": "1", "vote": "tie"}\n', "no decided"),
                         ('{"id": "1", "vote": "C"}\n', "not A, B or tie")):
        with open(os.path.join(d, "bad.jsonl"), "w") as f:
            f.write(text)
        r = run(["compare", "score", d, "--votes", os.path.join(d, "bad.jsonl")], ok=False)
        lines = r.stderr.strip().splitlines()
        check(f"score error: {needle}", r.returncode == 1 and len(lines) == 1 and needle in lines[0],
              lines[0] if lines else "(none)")


def main():
    tmp = tempfile.mkdtemp(prefix="st_compare_")
    try:
        check_models_sheet(tmp)
        n = 12
        out = make_text_sheet(tmp, n)
        votes, outcome = check_page(tmp, out, n)
        check_score(tmp, out, votes, outcome)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)
    print("all compare checks passed")


if __name__ == "__main__":
    main()
