"""text_corpus.py — a varied multilingual corpus (training text and a held-out hard set) for the tokenizer
and chat reference tests. Deterministic given the seed; nothing is downloaded."""
import random

WORDS = {
    "en": "the quick brown fox jumps over lazy dog we they you it's don't I'M WE'LL she'd they've "
          "tokenizer training model data weights gradient shard rank checkpoint".split(),
    "fr": "été déjà garçon français où naïve cœur Noël élève à côté fenêtre hôpital".split(),
    "de": "Straße Größe über schön Mädchen Fußgänger weiß Äpfel Öl".split(),
    "ru": "привет мир данные модель обучение токен быстро Москва".split(),
    "el": "καλημέρα κόσμε λόγος Ελλάδα σοφία".split(),
    "ar": "مرحبا بالعالم البيانات نموذج".split(),
    "hi": "नमस्ते दुनिया भाषा मॉडल".split(),
    "zh": list("我们今天学习机器翻译模型的训练数据非常重要中文分词测试"),
    "ja": list("こんにちは世界カタカナひらがな漢字東京日本語"),
    "ko": "안녕하세요 세계 한국어 토큰 데이터".split(),
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🤖", "✨"],
    "code": ["def f(x):", "return x**2", "if (a && b) {", "}", "x += 1;", "#include <stdio.h>",
             "for i in range(10):", "print(f\"{x:>8}\")", "a[i]=b[j]*c;", "// comment", "0xFF", "-> None"],
}
ODD = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000", "e\u0301", "a\u0308", "\u1e9b\u0323",
       "ﬁ", "①", "Ⅻ", "ｶﾀｶﾅ", "'s", "'S", "'ll", "'LL", "'ve", "'ſ", "...", "!!!", "?!", "—", "«»", "“quoted”"]


def sentence(rng):
    parts = []
    for _ in range(rng.randint(3, 14)):
        r = rng.random()
        if r < 0.55:
            lang = rng.choice(list(WORDS))
            w = rng.choice(WORDS[lang])
            if lang in ("zh", "ja"):
                w = "".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(1, 6)))
            parts.append(w)
        elif r < 0.7:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif r < 0.85:
            parts.append(rng.choice(ODD))
        else:
            parts.append(rng.choice(WORDS["en"]) + rng.choice([",", ".", ":", ";", "!", "?", "'s", "'t"]))
    out = ""
    for p in parts:
        out += p + rng.choice([" ", " ", " ", "", "  ", "\n"])
    return out


def corpus(seed, n):
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


HARD = [
    "", " ", "  ", "\n", "\r\n", "\t\t", "   leading spaces", "trailing spaces   ", "a  b   c    d",
    "Hello world", "HELLO WORLD'S END", "I'M HERE, YOU'RE THERE, WE'VE GONE", "don't won't can't 'll 'd",
    "12345678901234567890", "3.14159 2,718 1e10 0x1F", "１２３ ٣٤٥ ४५६",
    "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 thumbs", "é vs e\u0301 and Å vs A\u030a", "ﬁ ligature Ⅻ ① ｶﾀｶﾅ",
    "中文测试，没有空格。日本語のテキスト、カタカナ。한국어 문장입니다.", "line1\r\nline2\rline3\nline4",
    "mixed\u00a0nbsp\u3000ideographic\u2009thin", "tabs\tand\t\tmore\ttabs", "code: def f(x):\n    return x**2\n",
    "   \n\n   \n", "'ſ 'S 'ſt", "ZWJ\u200djoin and ZWNJ\u200cnon", "e\u0301\u0301\u0323 stacked marks",
    "\U0001F600\U0001F601 emoji run", "a" * 300, " " * 40 + "x", "9" * 50, "<|endoftext|>",
]
