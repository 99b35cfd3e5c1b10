"""The demo model's training data and vocabulary.

Text: the Lee news corpus inside gensim's wheel (gensim/test/test_data/lee_background.cor, fetched with
`pip download gensim==4.4.0 --no-deps`) and the documentation strings of Python's standard library (read from its
sources with `ast`, nothing imported). Synthetic conversations rendered with our DeepSeek V4 chat template:
arithmetic with a short worked thinking section, two demo tools called as DSML tool calls and then answered from
the tool's result, and JSON objects. Held-out problems (a fixed hash split of the problem space, held-out cities)
never appear in training data.

Vocabulary: a byte-level BPE trained on this corpus with DeepSeek V4's pre-tokenizer (llama_dsv4/tokenizer.py),
digits kept one per token (merges of digits dropped, so arithmetic is digit by digit), with --split-capitals no
merge of a space with a capital letter (a name after a space is the same tokens as in a tool call), and DeepSeek
V4's special tokens.
`python -m train.data --out DIR` writes DIR/vocab.json, DIR/train.bin, DIR/heldout_text.bin and DIR/heldout.json
(and DIR/train_mask.bin, DIR/train_starts.bin: which tokens are trained, where windows start).
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import random
import re
import sysconfig
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_dsv4.chat.template import render
from llama_dsv4.chat.templates import default_chat_template
from llama_dsv4.demo import DEMO_TOOLS
from llama_dsv4.model.vocab import (
    BOS_TEXT,
    CHAT_TOKENS,
    CONTROL,
    EOS_TEXT,
    NORMAL,
    PAD_TEXT,
    USER_DEFINED,
    Vocab,
    bytes_to_unicode,
)
from llama_dsv4.tokenizer import _SPLITS, DSV4Tokenizer

GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
LEE = "gensim/test/test_data/lee_background.cor"

TOOLS: list[dict[str, Any]] = DEMO_TOOLS  # get_weather(city), convert_currency(amount, from, to)

# fmt: off
CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin", "Oslo",
    "Stockholm", "Helsinki", "Copenhagen", "Athens", "Budapest", "Brussels", "Amsterdam", "Zurich", "Geneva",
    "Munich", "Hamburg", "Milan", "Naples", "Barcelona", "Seville", "Porto", "Lyon", "Marseille", "Tokyo", "Osaka",
    "Kyoto", "Seoul", "Beijing", "Shanghai", "Delhi", "Mumbai", "Bangkok", "Hanoi", "Manila", "Jakarta", "Sydney",
    "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver", "Austin",
    "Miami", "Atlanta", "Dallas", "Houston", "Phoenix", "Portland", "Lima", "Bogota", "Santiago", "Quito", "Caracas",
    "Havana", "Cairo", "Nairobi", "Lagos", "Accra", "Dakar", "Tunis", "Casablanca", "Istanbul", "Ankara", "Tehran",
    "Baghdad", "Riyadh", "Dubai", "Doha", "Karachi", "Lahore", "Dhaka", "Colombo", "Kathmandu", "Tashkent", "Almaty",
    "Kyiv", "Minsk", "Riga",
)
HELDOUT_CITIES = ("Edinburgh", "Krakow", "Valencia", "Bordeaux", "Nagoya", "Perth", "Ottawa", "Calgary", "Cusco",
                  "Marrakesh", "Tbilisi", "Yerevan")
# real places in neither list: train.train follows how well the model copies them while it trains (the copy probe)
PROBE_CITIES = ("Glasgow", "Dresden", "Bristol", "Leeds", "Nantes", "Bergen", "Gdansk", "Malaga", "Turin", "Florence",
                "Sapporo", "Busan", "Kazan", "Mombasa", "Rosario", "Halifax")
# fmt: on
# invented place names: most weather requests name one, so the model learns to copy the city from the request
# rather than to recall one of the cities it has seen (the held-out cities are real ones it never saw)
SYLLABLES = (
    "ba",
    "bel",
    "dor",
    "ka",
    "len",
    "mar",
    "ni",
    "os",
    "pra",
    "quen",
    "ri",
    "sal",
    "tor",
    "ul",
    "ven",
    "wes",
    "zan",
    "gra",
    "fel",
    "hav",
    "ist",
    "jor",
    "lu",
    "mo",
    "nor",
    "per",
    "rav",
    "sten",
    "tam",
    "vik",
)
PLACE_ENDS = ("", "", "a", "burg", "ton", "ville", "ford", "holm", "grad", "polis", "stad", "mouth")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "SEK")
RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "CAD": 1.36, "AUD": 1.52, "CNY": 7.2,
         "INR": 83.0, "SEK": 10.4}  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")
# fmt: off
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Liam", "Mia",
    "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Omar",
)
# fmt: on
ITEMS = ["lamp", "chair", "kettle", "bicycle", "backpack", "notebook", "camera", "guitar", "umbrella", "blender"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple"]


def heldout(*key: Any) -> bool:
    """A fixed 1-in-10 split of problems by hash: held-out problems never enter training data."""
    return hashlib.sha256(repr(key).encode()).digest()[0] < 26


# ---------------------------------------------------------------------------------------------- arithmetic


def digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def add_steps(a: int, b: int) -> str:
    """Units first; each step writes the digits' sum and the answer so far (the new digit in front of the last
    answer so far), so every step reads only nearby tokens: `2 + 1 = 3, so far 3. 9 + 2 = 11, so far 13. ...`"""
    da, db, carry, out, far = digits(a), digits(b), 0, [], ""
    for i in range(max(len(da), len(db))):
        x, y = da[i] if i < len(da) else 0, db[i] if i < len(db) else 0
        s = x + y + carry
        far = str(s % 10) + far
        out.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}, so far {far}.")
        carry = s // 10
    if carry:
        out.append(f"Carry 1, so far 1{far}.")
    return " ".join(out)


SUB_FORMS = ("plain", "compare", "borrow")  # how a subtraction is worked: sub_steps' `form`; "plain" is shipped


def sub_digits(a: int, b: int) -> tuple[list[str], int]:
    """a - b column by column from the units, over the longer operand's digits (a missing digit is 0): the steps
    (`2 - 9 = 3 borrow 1, so far 3.`) and the borrow left after the last column (1 exactly when a < b)."""
    da, db, borrow, out, far = digits(a), digits(b), 0, [], ""
    for i in range(max(len(da), len(db))):
        x, y, b_in = da[i] if i < len(da) else 0, db[i] if i < len(db) else 0, borrow
        s = x - y - b_in
        borrow = 1 if s < 0 else 0
        far = str(s + 10 * borrow) + far
        out.append(f"{x} - {y}" + (" - 1" if b_in else "") + f" = {s + 10 * borrow}" + (" borrow 1" if borrow else "")
                   + f", so far {far}.")  # fmt: skip
    return out, borrow


def sub_steps(a: int, b: int, form: str = "plain") -> str:
    """As add_steps, with a borrow: `2 - 9 = 3 borrow 1, so far 3. ...`. Each form works a < b as -(b - a) and
    differs in where it decides that a < b:
    - "plain": the first token already decides (`501 is less than 941, so compute 941 - 501 and negate. ...`: a's
      first digit for a < b, a's last digit for the digit steps of a >= b);
    - "compare": the working first restates both operands (`Compare 366 with 117: 366 is not less than 117. 6 - 7 =
      ...`, `Compare 501 with 941: 501 is less than 941, so compute ...`), so its first tokens are the same on both
      paths and the choice is a word read after both numbers;
    - "borrow": no comparison at all: the digit steps of a - b always come first (the first token is a's units
      digit, found before the `-`), and a borrow left after the last column is what says a < b: `A borrow is left,
      so the answer is negative: subtract the other way round.` and the digit steps of b - a (no operand restated).
      For a >= b this is the plain working."""
    if form not in SUB_FORMS:
        raise ValueError(f"subtraction form {form!r}: expected one of {SUB_FORMS}")
    if form == "compare":  # for a < b the plain working already says so: `a is less than b, so compute ...`
        return f"Compare {a} with {b}: " + ("" if a < b else f"{a} is not less than {b}. ") + sub_steps(a, b)
    if form == "plain" and a < b:
        return f"{a} is less than {b}, so compute {b} - {a} and negate. " + sub_steps(b, a)
    steps, borrow = sub_digits(a, b)
    if borrow:  # form "borrow", a < b
        steps += ["A borrow is left, so the answer is negative: subtract the other way round.", *sub_digits(b, a)[0]]
    return " ".join(steps)


def mul_steps(a: int, b: int) -> str:
    da, carry, out, far = digits(a), 0, [], ""
    for i, x in enumerate(da):
        s = x * b + carry
        carry = s // 10
        far = (str(s) if i == len(da) - 1 else str(s % 10)) + far
        out.append(f"{x} * {b}" + (f" + {s - x * b}" if s - x * b else "") + f" = {s}, so far {far}.")
    return " ".join(out)


OPS = {"+": (lambda a, b: a + b, add_steps), "-": (lambda a, b: a - b, sub_steps), "*": (lambda a, b: a * b, mul_steps)}
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.",
             "What's {a} {op} {b}?")  # fmt: skip


def arithmetic_problem(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("++--*")
    if op == "*":
        return rng.randrange(2, 100), op, rng.randrange(2, 10)
    return rng.randrange(0, 1000), op, rng.randrange(0, 1000)


def working_in_answer(reply: dict[str, Any]) -> dict[str, Any]:
    """An arithmetic reply of arithmetic_messages as it is written when thinking is off: the working, then the
    answer, both in the content."""
    return {"role": "assistant", "content": reply["reasoning_content"] + " So " + reply["content"]}


def arithmetic_messages(
    a: int, op: str, b: int, rng: random.Random, subtraction: str = "plain"
) -> tuple[list[dict[str, Any]], int]:
    """A question and its worked answer (the working as reasoning); `subtraction`: sub_steps' form (SUB_FORMS)."""
    f, steps = OPS[op]
    ans = f(a, b)
    q = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
    working = sub_steps(a, b, subtraction) if op == "-" else steps(a, b)
    return [
        {"role": "user", "content": q},
        {"role": "assistant", "reasoning_content": working, "content": f"{a} {op} {b} = {ans}"},
    ], ans


# ---------------------------------------------------------------------------------------------- tools

WEATHER_Q = ("What's the weather in {c}?", "What is the weather like in {c} today?", "Is it raining in {c}?",
             "How warm is it in {c} right now?", "Tell me the weather in {c}.")  # fmt: skip
CURRENCY_Q = ("Convert {n} {f} to {t}.", "How much is {n} {f} in {t}?", "What is {n} {f} in {t}?",
              "Please convert {n} {f} into {t}.")  # fmt: skip


def money(x: float) -> str:
    return f"{x:.2f}"


def weather_messages(city: str, rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    temp, cond = rng.randrange(-10, 36), rng.choice(CONDITIONS)
    call = {"name": "get_weather", "arguments": {"city": city}}
    result = json.dumps({"city": city, "temperature_c": temp, "condition": cond})
    return [
        {"role": "user", "content": rng.choice(WEATHER_Q).format(c=city)},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": f"It is {temp} °C and {cond} in {city}."},
    ], call


def currency_messages(n: int, f: str, t: str, rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    call = {"name": "convert_currency", "arguments": {"amount": n, "from": f, "to": t}}
    res = round(n / RATES[f] * RATES[t], 2)
    return [
        {"role": "user", "content": rng.choice(CURRENCY_Q).format(n=n, f=f, t=t)},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": json.dumps({"amount": n, "from": f, "to": t, "result": res})},
        {"role": "assistant", "content": f"{n} {f} is {money(res)} {t}."},
    ], call


def invented_place(rng: random.Random) -> str:
    """A place that does not exist: syllables and a town ending, or letters in consonant-vowel turns (which the
    vocabulary splits into pieces of every kind, so the model learns to copy any name, not only syllables)."""
    if rng.random() < 0.5:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))) + rng.choice(PLACE_ENDS)
    else:
        cons, vow = "bcdfghjklmnprstvwyz", "aeiou"
        parts = [rng.choice(cons) + rng.choice(vow) + (rng.choice(cons) if rng.random() < 0.3 else "")
                 for _ in range(rng.randrange(2, 5))]  # fmt: skip
        name = "".join(parts)
    return name.capitalize()


def proper_nouns(texts: list[str], least: int = 2) -> list[str]:
    """Capitalised words of the training text seen at least `least` times (people, places, organisations of the
    news corpus), the held-out cities left out: names the vocabulary splits as it splits real names, for copying."""
    seen: dict[str, int] = {}
    for t in texts:
        for w in re.findall(r"\b[A-Z][a-z]{2,}\b", t):
            seen[w] = seen.get(w, 0) + 1
    unseen = HELDOUT_CITIES + PROBE_CITIES
    return sorted(w for w, c in seen.items() if c >= least and not any(h in w for h in unseen))


def train_place(rng: random.Random, names: Sequence[str]) -> str:
    """A name to copy in a training conversation: an invented place, or (a third of the time, given `names`) a
    capitalised word of the training text."""
    return rng.choice(names) if names and rng.random() < 1 / 3 else invented_place(rng)


def tool_problem(rng: random.Random) -> tuple:
    if rng.random() < 0.6:
        if rng.random() < 0.75:
            return ("weather", invented_place(rng))
        return ("weather", rng.choice(CITIES + HELDOUT_CITIES))
    f, t = rng.sample(CURRENCIES, 2)
    return ("currency", rng.choice([rng.randrange(1, 1000), rng.randrange(1, 100) * 10]), f, t)


def tool_is_heldout(prob: tuple) -> bool:
    return prob[1] in HELDOUT_CITIES if prob[0] == "weather" else heldout(*prob)


def tool_messages(prob: tuple, rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return weather_messages(prob[1], rng) if prob[0] == "weather" else currency_messages(*prob[1:], rng)


# ---------------------------------------------------------------------------------------------- JSON

JSON_Q = (
    ("person", "Give me a JSON object for a person named {name} who is {age} years old and lives in {city}.",
     lambda r: {"name": r["name"], "age": r["age"], "city": r["city"]}),
    ("product", "Reply with a JSON object describing a {color} {item} that costs {price} dollars.",
     lambda r: {"item": r["item"], "color": r["color"], "price": r["price"]}),
    ("list", "Return JSON with the key \"numbers\" holding the numbers from {lo} to {hi}.",
     lambda r: {"numbers": list(range(r["lo"], r["hi"] + 1))}),
)  # fmt: skip


def json_problem(rng: random.Random) -> tuple:
    kind = rng.randrange(len(JSON_Q))
    lo = rng.randrange(0, 20)
    slots = {"name": rng.choice(NAMES), "age": rng.randrange(18, 90), "city": rng.choice(CITIES),
             "color": rng.choice(COLORS), "item": rng.choice(ITEMS), "price": rng.randrange(5, 500),
             "lo": lo, "hi": lo + rng.randrange(2, 7)}  # fmt: skip
    return (kind, tuple(sorted(slots.items())))


def json_messages(prob: tuple) -> tuple[list[dict[str, Any]], Any]:
    _, q, obj = JSON_Q[prob[0]]
    slots = dict(prob[1])
    value = obj(slots)
    return [{"role": "user", "content": q.format(**slots)}, {"role": "assistant", "content": json.dumps(value)}], value


# ---------------------------------------------------------------------------------------------- rendering


def render_chat(messages: list[dict[str, Any]], *, tools: Any = None, thinking: bool = False, gen: bool = False) -> str:
    """A conversation as the model sees it (with gen=True: the prompt, ending where the model starts writing)."""
    v: dict[str, Any] = {"messages": messages, "bos_token": BOS_TEXT, "add_generation_prompt": gen,
                         "thinking": thinking}  # fmt: skip
    if tools:
        v["tools"] = tools
    return render(default_chat_template(), **v)


COPY_Q = ("Repeat after me: {x}", "Say {x}.", "Copy this exactly: {x}", "Please write {x} back to me.",
          "Put {x} in quotes.")  # fmt: skip


def copy_messages(rng: random.Random, names: Sequence[str], items: int = 3) -> list[dict[str, Any]]:
    """A drill in copying: one to three names (invented, or words of the training text) said back, plain or
    quoted, as a tool call's argument copies a city from the request; with `items` > 3, lists of 2 to `items` names
    (longer copies: every name after the first is predictable only by finding it in the request)."""
    k = rng.choice((1, 1, 2, 3)) if items <= 3 else rng.randint(2, items)
    x = " ".join(train_place(rng, names) for _ in range(k))
    i = rng.randrange(len(COPY_Q))
    return [{"role": "user", "content": COPY_Q[i].format(x=x)},
            {"role": "assistant", "content": f'"{x}"' if i == len(COPY_Q) - 1 else x}]  # fmt: skip


def synthetic(
    rng: random.Random, kind: str, names: Sequence[str] = (), copy_items: int = 3, subtraction: str = "plain"
) -> str | None:
    """One training conversation of `kind`, or None when the drawn problem is held out; `names` (words of the
    training text) join the invented places that weather requests, JSON people and copy drills name."""
    if kind == "arith":
        a, op, b = arithmetic_problem(rng)
        if heldout(a, op, b):
            return None
        msgs, _ = arithmetic_messages(a, op, b, rng, subtraction)
        thinking = rng.random() < 0.5
        if not thinking:  # the working goes in the answer when thinking is off
            msgs[1] = working_in_answer(msgs[1])
        return render_chat(msgs, tools=TOOLS if rng.random() < 0.02 else None, thinking=thinking)
    if kind == "tool":
        prob = tool_problem(rng)
        if tool_is_heldout(prob):
            return None
        if names and prob[0] == "weather" and prob[1] not in CITIES:  # an invented place: or a word of the text
            prob = ("weather", train_place(rng, names))
        msgs, _ = tool_messages(prob, rng)
        return render_chat(msgs, tools=rng.sample(TOOLS, 2))
    if kind == "copy":
        return render_chat(copy_messages(rng, names, copy_items))
    prob = json_problem(rng)
    if heldout(prob):
        return None
    if names and rng.random() < 0.5:  # the person lives somewhere the model has to copy
        slots = dict(prob[1])
        slots["city"] = train_place(rng, names)
        prob = (prob[0], tuple(sorted(slots.items())))
    msgs, _ = json_messages(prob)
    return render_chat(msgs, tools=TOOLS if rng.random() < 0.1 else None)


def copy_probe(tok: DSV4Tokenizer, seed: int, subtraction: str = "plain") -> list[dict[str, Any]]:
    """What a tool call copies from the request, on problems never trained: weather requests naming PROBE_CITIES
    (kind "city": the positions of the city's tokens in the call after its first one, found only by copying) and 16
    held-out currency conversions (kind "currency": the positions of the `from` and `to` codes in the call, written
    without the space they have in the request unless the vocabulary was trained with split_capitals) and 16
    held-out subtractions (kind "sub": every digit of the working and the answer, thinking off; scored by the item,
    PROBE_WHOLE). train.train reports the model's top-1 accuracy on each kind, teacher-forced, as it trains;
    train.evaluate on an exported file."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []

    def n_tokens(text: str) -> int:
        return len(tok.tokenize(text.encode(), add_bos=False, special=True))

    for city in PROBE_CITIES:
        s = render_chat(weather_messages(city, rng)[0], tools=TOOLS)
        at = s.index(f'">{city}<') + 2
        ids = tok.tokenize(s.encode(), add_bos=False, special=True)
        pieces = range(n_tokens(s[:at]) + 1, n_tokens(s[: at + len(city)]))
        out.append({"kind": "city", "ids": ids, "targets": list(pieces)})
    n_currency = 0
    while n_currency < 16:
        f, t = rng.sample(CURRENCIES, 2)
        prob = ("currency", rng.randrange(1, 1000), f, t)
        if not tool_is_heldout(prob):
            continue
        s = render_chat(currency_messages(*prob[1:], rng)[0], tools=TOOLS)
        targets = []
        for name, code in (("from", f), ("to", t)):
            at = s.index(">", s.rindex(f'name="{name}"')) + 1
            if s[at : at + len(code)] != code:
                raise RuntimeError(f"the chat template no longer writes {name}={code!r} as this probe expects")
            n0, n1 = n_tokens(s[:at]), n_tokens(s[: at + len(code)])
            targets.extend(range(n0, n1))
        ids = tok.tokenize(s.encode(), add_bos=False, special=True)
        out.append({"kind": "currency", "ids": ids, "targets": targets})
        n_currency += 1
    n_sub = 0
    while n_sub < 16:  # held-out subtractions, answered with the working (thinking off): every digit it writes
        a, b = rng.randrange(0, 1000), rng.randrange(0, 1000)
        if not heldout(a, "-", b):
            continue
        msgs, _ = arithmetic_messages(a, "-", b, rng, subtraction)
        reply = working_in_answer(msgs[1])
        answer = reply["content"]
        s = render_chat([msgs[0], reply])
        at = s.rindex(answer)
        ids = tok.tokenize(s.encode(), add_bos=False, special=True)
        targets = [n_tokens(s[: at + i]) for i, c in enumerate(answer) if c.isdigit()]
        out.append({"kind": "sub", "ids": ids, "targets": targets})
        n_sub += 1
    return out


# copy_probe's kinds, each with its column in train.train's loss.csv, in the columns' order
PROBE_COLUMNS = {"city": "copy", "currency": "currency", "sub": "sub"}
PROBE_KINDS = tuple(PROBE_COLUMNS)
# kinds scored by the item (the share of items with every target right) rather than by the token: one wrong digit
# in a subtraction's working is a wrong answer, and teacher-forced digits are otherwise right 99 % of the time
PROBE_WHOLE = frozenset({"sub"})


def probe_score(kind: str, right: list[bool]) -> tuple[int, int]:
    """(hits, count) of one probe item whose targets came out `right`: per token, or per item for PROBE_WHOLE."""
    return (int(all(right)), 1) if kind in PROBE_WHOLE else (sum(right), len(right))


def probe_kind(item: dict[str, Any]) -> str:
    """A copy-probe item's kind; probes written before the currency items hold cities only, without the key."""
    return str(item.get("kind", "city"))


def write_copy_probe(out: str, tok: DSV4Tokenizer, seed: int) -> None:
    with open(os.path.join(out, "copy_probe.json"), "w", encoding="utf-8") as f:
        json.dump(copy_probe(tok, seed + 2, data_format(out)["subtraction"]), f)


FORMAT_CHOICES = {"subtraction": SUB_FORMS}  # a format.json key's values; the first is the shipped model's data
FORMAT_DEFAULTS = {k: v[0] for k, v in FORMAT_CHOICES.items()}


def data_format(folder: str) -> dict[str, Any]:
    """How the conversations in a data folder are written (its format.json, from build; FORMAT_DEFAULTS for data
    written before there was one): train.evaluate renders its held-out conversations the same way. Data written
    with the first form of the file, `{"sub_compare": true/false}`, reads as subtraction "compare"/"plain"."""
    path = os.path.join(folder, "format.json")
    if not os.path.exists(path):
        return dict(FORMAT_DEFAULTS)
    try:
        with open(path, encoding="utf-8") as f:
            got = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if isinstance(got, dict) and set(got) == {"sub_compare"} and isinstance(got["sub_compare"], bool):
        got = {"subtraction": "compare" if got["sub_compare"] else "plain"}
    known = isinstance(got, dict) and not set(got) - set(FORMAT_DEFAULTS)
    if not known or any(got.get(k, FORMAT_DEFAULTS[k]) not in choices for k, choices in FORMAT_CHOICES.items()):
        raise ValueError(f"{path}: expected an object with keys among {FORMAT_CHOICES}, got {got!r}")
    return {**FORMAT_DEFAULTS, **got}


def heldout_problems(n: int, seed: int) -> dict[str, list[Any]]:
    """n held-out problems of each skill (never in training data)."""
    rng = random.Random(seed)
    out: dict[str, list[Any]] = {"arith": [], "tool": [], "json": []}
    while min(len(v) for v in out.values()) < n:
        p = arithmetic_problem(rng)
        if heldout(*p) and len(out["arith"]) < n and p not in out["arith"]:
            out["arith"].append(p)
        t = tool_problem(rng)
        if tool_is_heldout(t) and len(out["tool"]) < n and t not in out["tool"]:
            out["tool"].append(t)
        j = json_problem(rng)
        if heldout(j) and len(out["json"]) < n and j not in out["json"]:
            out["json"].append(j)
    return out


# ---------------------------------------------------------------------------------------------- text


def lee_corpus(wheel_dir: str) -> list[str]:
    paths = glob.glob(os.path.join(wheel_dir, GENSIM_WHEEL_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {GENSIM_WHEEL_GLOB} in {wheel_dir}: pip download gensim==4.4.0 --no-deps -d DIR")
    with zipfile.ZipFile(paths[0]) as z:
        return [line.strip() for line in z.read(LEE).decode("utf-8").splitlines() if line.strip()]


def stdlib_docstrings(limit_chars: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py"))):
        if "test" in path or "site-packages" in path or "idlelib" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    out.append(doc)
                    total += len(doc)
                    if total >= limit_chars:
                        return out
    return out


# ---------------------------------------------------------------------------------------------- vocabulary

SPECIAL_TEXTS = (BOS_TEXT, EOS_TEXT, PAD_TEXT)


def _space_capital(a: str, b: str) -> bool:
    """A merge of a space with a capitalised piece (`Ġ` + `JPY`, `Ġ` + `K`): dropped, so that a name or a currency
    code after a space is the same tokens as in a tool call's argument (` JPY` -> `Ġ`, `JPY`; `">JPY` -> `">`,
    `JPY`), and copying it is repeating tokens rather than mapping one token to another."""
    return a == "\u0120" and "A" <= b[:1] <= "Z"


def train_vocab(texts: list[str], size: int, split_capitals: bool = False) -> Vocab:
    """A byte-level BPE of `size` tokens trained on `texts` with DeepSeek V4's pre-tokenizer; digits stay single,
    and with `split_capitals` no merge joins a space to a capital letter (`_space_capital`; the shipped demo model's
    vocabulary has them)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    alphabet = list(bytes_to_unicode().values())
    n_merges = size - len(SPECIAL_TEXTS) - 256 - len(CHAT_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges * 2, initial_alphabet=alphabet, show_progress=False)
    # the chat markup is split out so that no merge crosses a special token
    specials = sorted(SPECIAL_TEXTS + CHAT_TOKENS, key=len, reverse=True)

    def pieces() -> Any:
        for t in texts:
            for s in specials:
                t = t.replace(s, "\n")
            yield t

    tk.train_from_iterator(pieces(), trainer)
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    digit = set("0123456789")
    have, kept, products = set(alphabet), [], []
    for m in merges:
        a, b = m.split(" ", 1)
        if digit & set(a + b) or a not in have or b not in have or a + b in have:
            continue
        if split_capitals and _space_capital(a, b):
            continue
        kept.append(m)
        products.append(a + b)
        have.add(a + b)
        if len(kept) == n_merges:
            break
    tokens = list(SPECIAL_TEXTS) + alphabet + products + list(CHAT_TOKENS)
    types = [CONTROL] * 3 + [NORMAL] * (256 + len(products))
    types += [CONTROL if t.startswith("<｜") else USER_DEFINED for t in CHAT_TOKENS]
    return Vocab("gpt2", "deepseek-v3", tuple(tokens), np.array(types, np.int32), tuple(kept), 0, 1, 1, False, False)


def vocab_to_json(v: Vocab) -> dict[str, Any]:
    return {"tokens": list(v.tokens), "types": v.token_types.tolist(), "merges": list(v.merges)}


def vocab_from_json(d: dict[str, Any]) -> Vocab:
    return Vocab("gpt2", "deepseek-v3", tuple(d["tokens"]), np.array(d["types"], np.int32), tuple(d["merges"]),
                 0, 1, 1, False, False)  # fmt: skip


# ---------------------------------------------------------------------------------------------- build


def assistant_mask(ids: list[int], assistant: int, eos: int) -> list[int]:
    """1 for the tokens the model writes in a conversation (after each `<｜Assistant｜>` up to its end-of-sentence
    token, inclusive), 0 for the prompt, the tool definitions and the tool results: only the former are trained."""
    out, on = [], False
    for t in ids:
        out.append(int(on))
        if t == assistant:
            on = True
        elif t == eos:
            on = False
    return out


def copy_weights(ids: list[int], mask: list[int], weight: int, user: int) -> list[int]:
    """`mask` with `weight` in place of 1 where the token the model writes continues a pair of tokens that a user
    turn or a tool result holds (ids[i - 1], ids[i] seen there, untrained, after the first `user` token): the tokens
    found only by copying from the request (a city's pieces after its first in a tool call, operands restated, a
    tool result's figures), which the plain loss drowns among the tokens the model predicts from the template."""
    seen: set[tuple[int, int]] = set()
    out = list(mask)
    start = ids.index(user) if user in ids else len(ids)
    for i in range(start + 1, len(ids)):
        pair = (ids[i - 1], ids[i])
        if mask[i] and pair in seen:
            out[i] = weight
        elif not mask[i] and not mask[i - 1]:
            seen.add(pair)
    return out


def build(
    out: str,
    wheel_dir: str,
    seed: int,
    counts: dict[str, int],
    vocab_size: int,
    vocab_json: str | None = None,
    seq: int = 576,
    copy_names: bool = False,
    copy_items: int = 3,
    copy_weight: int = 1,
    split_capitals: bool = False,
    subtraction: str = "plain",
) -> None:
    """Writes train.bin (uint16 tokens), train_mask.bin (uint8: the token's weight as a training target, 0 where it
    is not one; `copy_weight` for the tokens copy_weights finds in conversations, 1 for the others),
    train_starts.bin (int64: window starts, the start of every document and every `seq` tokens inside text), the
    held-out text and problems and the vocabulary."""
    rng = random.Random(seed)
    text = lee_corpus(wheel_dir) + stdlib_docstrings(3_000_000)
    rng.shuffle(text)
    n_held = max(1, len(text) // 40)
    held_text, text = text[:n_held], text[n_held:]
    names = proper_nouns(text) if copy_names else []
    convs: list[tuple[str, str]] = []
    for kind, n in counts.items():
        made = 0
        while made < n:
            c = synthetic(rng, kind, names, copy_items, subtraction)
            if c is not None:
                convs.append((kind, c))
                made += 1
    rng.shuffle(convs)
    if vocab_json:  # the vocabulary of an earlier phase (its weights' token ids)
        with open(vocab_json, encoding="utf-8") as f:
            vocab = vocab_from_json(json.load(f))
    else:
        vocab = train_vocab(text[:4000] + [c for _, c in convs[:20000]], vocab_size, split_capitals)
    tok = DSV4Tokenizer(vocab)
    bos, eos = vocab.bos_id, vocab.eos_id
    assistant, user = vocab.tokens.index("<｜Assistant｜>"), vocab.tokens.index("<｜User｜>")
    docs: list[tuple[str, list[int], list[int]]] = []
    for t in text:
        ids = [bos, *tok.tokenize(t.encode(), add_bos=False, special=True), eos]
        docs.append(("text", ids, [1] * len(ids)))
    for kind, c in convs:
        ids = tok.tokenize(c.encode(), add_bos=False, special=True)
        m = assistant_mask(ids, assistant, eos)
        docs.append((kind, ids, copy_weights(ids, m, copy_weight, user) if copy_weight != 1 else m))
    rng.shuffle(docs)
    stream, mask, starts, per_kind = [], [], [], dict.fromkeys(["text", *counts], 0)
    for kind, ids, m in docs:
        starts.extend(range(len(stream), len(stream) + len(ids), seq if kind == "text" else len(ids)))
        stream.extend(ids)
        mask.extend(m)
        per_kind[kind] += len(ids)
    held = np.array([t for d in ([bos, *tok.tokenize(t.encode(), add_bos=False), eos] for t in held_text) for t in d],
                    np.uint16)  # fmt: skip
    os.makedirs(out, exist_ok=True)
    np.array(stream, np.uint16).tofile(os.path.join(out, "train.bin"))
    np.array(mask, np.uint8).tofile(os.path.join(out, "train_mask.bin"))
    np.array(starts, np.int64).tofile(os.path.join(out, "train_starts.bin"))
    held.tofile(os.path.join(out, "heldout_text.bin"))
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab_to_json(vocab), f)
    with open(os.path.join(out, "heldout.json"), "w", encoding="utf-8") as f:
        json.dump(heldout_problems(100, seed + 1), f)
    with open(os.path.join(out, "format.json"), "w", encoding="utf-8") as f:
        json.dump({"subtraction": subtraction}, f)
    write_copy_probe(out, tok, seed)
    shares = ", ".join(f"{k} {v / len(stream):.0%}" for k, v in per_kind.items())
    n_targets = max(1, sum(map(bool, mask)))
    heavy = "" if copy_weight == 1 else f", {sum(x > 1 for x in mask) / n_targets:.1%} of them weighted {copy_weight}"
    print(f"vocab {vocab.n_tokens} tokens; train stream {len(stream)} tokens ({shares}; {len(text)} text documents, "
          f"{len(convs)} conversations; {n_targets / len(mask):.0%} of the tokens are targets{heavy}); "
          f"held-out text {len(held)} tokens")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheels", help="folder holding gensim's wheel (pip download gensim==4.4.0)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--arith", type=int, default=70000, help="arithmetic conversations")
    ap.add_argument("--tool", type=int, default=40000, help="tool-calling conversations")
    ap.add_argument("--json", type=int, default=8000, help="JSON conversations")
    ap.add_argument("--copy", type=int, default=0, help="copy drills (an experiment: docs/demo-model.md)")
    ap.add_argument(
        "--copy-names",
        action="store_true",
        help="weather requests, JSON people and copy drills also name capitalised words of the text",
    )
    ap.add_argument("--copy-items", type=int, default=3, help="copy drills name up to this many names")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--vocab-json", help="use this vocabulary (an earlier phase's vocab.json) instead of training one")
    ap.add_argument(
        "--split-capitals",
        action="store_true",
        help="no merge of a space with a capital letter: a name after a space is the tokens a tool call writes",
    )
    ap.add_argument(
        "--subtraction",
        choices=SUB_FORMS,
        default=None,
        help="how a subtraction is worked (train.data.sub_steps): plain (the shipped model's), compare (first "
        "restates both operands and says which is less), borrow (the digit steps first; a borrow left means a < b)",
    )
    ap.add_argument(
        "--sub-compare", dest="subtraction", action="store_const", const="compare", help="--subtraction compare"
    )
    ap.add_argument("--seq", type=int, default=576, help="the training window (a long text gets a start every seq)")
    ap.add_argument("--copy-weight", type=int, default=1, help="loss weight of the tokens copied from the context")
    ap.add_argument(
        "--probe-only",
        action="store_true",
        help="only (re)write OUT/copy_probe.json, with OUT/vocab.json and the subtraction form of OUT/format.json "
        "(data written before the probe grew)",
    )
    a = ap.parse_args()
    if a.probe_only:
        if a.subtraction is not None:  # the probe must match the data it probes, so the folder says the form
            ap.error("--probe-only takes the subtraction form from OUT/format.json, not from --subtraction")
        with open(os.path.join(a.out, "vocab.json"), encoding="utf-8") as f:
            write_copy_probe(a.out, DSV4Tokenizer(vocab_from_json(json.load(f))), a.seed)
        return
    if not a.wheels:
        ap.error("--wheels is required (or --probe-only)")
    if not 1 <= a.copy_weight <= 255:
        ap.error("--copy-weight must be 1 to 255 (train_mask.bin holds one byte per token)")
    counts = {"arith": a.arith, "tool": a.tool, "json": a.json, "copy": a.copy}
    build(a.out, a.wheels, a.seed, counts, a.vocab, a.vocab_json, a.seq, a.copy_names, a.copy_items, a.copy_weight,
          a.split_capitals, a.subtraction or SUB_FORMS[0])  # fmt: skip


if __name__ == "__main__":
    main()
