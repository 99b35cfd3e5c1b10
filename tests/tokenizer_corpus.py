"""A deterministic corpus of varied strings and token-id sequences for tokenizer comparisons."""

from __future__ import annotations

import numpy as np

ASCII = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm",
    "don't",
    "it's O'Reilly's",
    "e.g. i.e. etc.",
    "HTTP/1.1 200 OK",
    "user@example.com",
    "https://example.com/path?q=1&r=2#frag",
    "C++ and C# and F#",
    "(a+b)*c",
    "Mr. Smith's 3rd-quarter results",
    "ALL CAPS TEXT",
    "camelCaseIdentifier",
    "snake_case_identifier",
    "--flag=value",
]
SPACES = [
    " ",
    "  ",
    "   ",
    "    ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    " \n ",
    "  \n\n  ",
    " \t \n",
    "\u3000",
    "\u00a0",
    "        ",
]
DIGITS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345",
    "1234567890",
    "3.14159",
    "-17",
    "1,000,000",
    "2026-11-28",
    "0x1F",
    "1e-6",
    "v0.3.36",
    "100%",
    "$19.99",
]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "import numpy as np",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM t WHERE id = 1;",
    '<div class="x">hi</div>',
    "const f = async () => await fetch(url);",
    "#include <stdio.h>",
    "x = lambda a, b: a if a > b else b",
    "    if err != nil {\n        return err\n    }",
    "$ pip install -e .",
    "// comment\n/* block */",
]
CJK = [
    "你好，世界",
    "深度求索",
    "我们今天去公园散步。",
    "日本語のテキスト",
    "カタカナ",
    "ひらがな",
    "東京タワー",
    "한국어 텍스트",
    "漢字とかな混じり文",
    "中文English混合",
    "数字123和汉字",
    "「引用」『二重』",
]
EMOJI = ["😀", "🎉🎊", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖 robot", "✨emoji✨", "🏳️‍🌈", "1️⃣"]
OTHER = [
    "Привет, мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Ελληνικά",
    "שלום",
    "café naïve résumé",
    "e\u0301",
    "Zürich straße",
    "ﬁ ligature",
    "½ ¼ ¾",
    "→ ← ↑ ↓",
    "©®™",
    "\u200b zero width",
    "ǅ ǈ",
    "ẞ",
]
SPECIAL = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜▁pad▁｜>",
    "<|EOT|>",
    "<｜fim▁hole｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜place▁holder▁no▁5｜>",
]
FRAGMENTS = [ASCII, SPACES, DIGITS, CODE, CJK, EMOJI, OTHER, SPECIAL]


def texts(n: int = 2400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [s for group in FRAGMENTS for s in group]  # each fragment alone
    out += [
        "",
        " Hello",
        "Hello ",
        "  leading and trailing  ",
        "a" * 300,
        " " * 65,
        "\n" * 20,
        "9" * 40,
        "<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>",
        "<think>reasoning</think>answer",
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">',
        "<｜User｜<｜User｜>>",
        "<think <think>>",
    ]
    while len(out) < n:
        k = int(rng.integers(1, 7))
        parts = []
        for _ in range(k):
            group = FRAGMENTS[int(rng.integers(len(FRAGMENTS)))]
            parts.append(group[int(rng.integers(len(group)))])
        sep = ["", " ", "\n", "  "][int(rng.integers(4))]
        out.append(sep.join(parts))
    return out[:n]


def invalid_utf8() -> list[bytes]:
    """Byte strings that are not valid UTF-8 (tokenize takes bytes)."""
    return [
        b"\xff",
        b"abc\xfe\xffdef",
        b"\xe4\xbd",
        "你好".encode()[:4],
        b"\xc3",
        b"ok \x80 ok",
        "😀".encode()[:3] + b"x",
    ]


def id_sequences(n_vocab: int, n: int = 600, seed: int = 1) -> list[list[int]]:
    """Random token-id sequences (pieces of multi-byte characters, control tokens, everything)."""
    rng = np.random.default_rng(seed)
    out = [[0], [1], [0, 19923], [128803], [128821, 128822]]
    for _ in range(n - len(out)):
        k = int(rng.integers(1, 12))
        seq = rng.integers(0, n_vocab, k).tolist()
        if rng.random() < 0.3:  # the BOS first: llama-cpp-python strips one leading space after it
            seq = [0, *seq]
        out.append([int(x) for x in seq])
    return out
