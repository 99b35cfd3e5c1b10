"""The training recipe's data (train/data.py): worked arithmetic that reaches the right answer (each step's digits
and the answer so far), held-out problems never generated for training, and a trained BPE vocabulary that keeps
DeepSeek V4's special tokens (no torch needed)."""

from __future__ import annotations

import os
import random
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_dsv4.model.vocab import CHAT_TOKENS
from llama_dsv4.tokenizer import DSV4Tokenizer
from train import data as D


def column_digits(steps: str) -> int:
    """The number the digit-by-digit working spells: each step's last digit from the units up, the last step's
    result whole (its tens are the final carry)."""
    results = [int(x) for x in re.findall(r"= (\d+)", steps)]
    return sum((r % 10) * 10**i for i, r in enumerate(results[:-1])) + results[-1] * 10 ** (len(results) - 1)


def test_worked_arithmetic_reaches_the_answer() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        a, op, b = D.arithmetic_problem(rng)
        msgs, ans = D.arithmetic_messages(a, op, b, rng)
        assert ans == {"+": a + b, "-": a - b, "*": a * b}[op]
        steps = msgs[1]["reasoning_content"]
        if op == "-" and a < b:
            steps = steps.split("negate. ", 1)[1]
        assert column_digits(steps) == abs(ans), (a, op, b, steps)
        assert int(re.findall(r"so far (\d+)", steps)[-1]) == abs(ans), steps  # the running answer ends on it
        assert msgs[1]["content"].endswith(f"= {ans}")


def sub_workings(form: str, seed: int, n: int) -> list[tuple[int, int, int, str, str]]:
    """n random subtractions below 1000 as (a, b, answer, working in `form`, plain working), both signs among them;
    the answer line is `a - b = answer` in every form."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randrange(0, 1000), rng.randrange(0, 1000)
        msgs, ans = D.arithmetic_messages(a, "-", b, random.Random(0), form)
        assert msgs[1]["content"] == f"{a} - {b} = {ans}"
        plain = D.arithmetic_messages(a, "-", b, random.Random(0))[0][1]["reasoning_content"]
        out.append((a, b, ans, msgs[1]["reasoning_content"], plain))
    assert {a < b for a, b, *_ in out} == {True, False}
    return out


def test_sub_compare_chooses_its_path_with_a_word_after_both_operands() -> None:
    """--subtraction compare: every subtraction's working begins `Compare a with b: a is `, the same tokens on both
    paths, then `less than` or `not less than` chooses; the digit steps that follow are the plain working's."""
    for a, b, ans, steps, plain in sub_workings("compare", 3, 400):
        head = f"Compare {a} with {b}: {a} is "
        assert steps.startswith(head), steps
        if a < b:  # the plain working already restates: `a is less than b, so compute b - a and negate. ...`
            assert steps == f"Compare {a} with {b}: " + plain, steps
        else:
            assert steps == head + f"not less than {b}. " + plain, steps
        assert column_digits(steps.split("negate. " if a < b else f"than {b}. ", 1)[1]) == abs(ans)


def test_sub_borrow_decides_the_sign_from_the_last_borrow() -> None:
    """--subtraction borrow: the digit steps of a - b always come first, over the longer operand's digits (a's
    units digit is the first token on both paths), and only a borrow left after the last column says a < b; then the
    digit steps of b - a. No operand is restated, and for a >= b the working is the plain one."""
    for a, b, _, steps, plain in sub_workings("borrow", 4, 600):
        assert steps.startswith(f"{a % 10} - {b % 10} "), steps
        first, turn, second = steps.partition(" A borrow is left, so the answer is negative: subtract the other way ")
        assert bool(turn) == (a < b), steps
        width = max(len(str(a)), len(str(b)))
        assert first.count(" = ") == width
        assert column_digits(first) == (a - b) % 10**width  # the columns of a - b, whatever its sign
        if a < b:
            assert second.startswith("round. ") and column_digits(second[7:]) == b - a
            assert not re.search(r"\d\d", re.sub(r"so far \d+", "", steps)), steps  # no operand restated
        else:
            assert steps == plain
    with pytest.raises(ValueError, match="subtraction form 'minus'"):
        D.sub_steps(3, 2, "minus")


def test_data_format_names_the_subtraction_form(tmp_path: os.PathLike[str]) -> None:
    """A data folder says how it works subtraction in format.json; evaluation and the probe read it (data without one
    is the shipped model's form, the first form of the file still reads); a bad file is named, not half-read."""
    for form in D.SUB_FORMS[1:]:  # only subtraction changes
        for op_args in ((12, "+", 5), (7, "*", 3)):
            assert D.arithmetic_messages(*op_args, random.Random(0), form) == D.arithmetic_messages(
                *op_args, random.Random(0)
            )
    assert D.data_format(str(tmp_path)) == {"subtraction": "plain"}
    path = os.path.join(tmp_path, "format.json")
    for text, want in (('{"subtraction": "borrow"}', "borrow"), ('{"sub_compare": true}', "compare"), ("{}", "plain")):
        with open(path, "w") as f:
            f.write(text)
        assert D.data_format(str(tmp_path)) == {"subtraction": want}
    for bad in ('{"subtraction": "yes"}', '{"sub_compare": "yes"}', '{"subtraction": ["plain"]}', "[1]", '{"x": 1}'):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.raises(ValueError, match=r"format\.json: expected an object"):
            D.data_format(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"subtraction": tr')
    with pytest.raises(ValueError, match=r"format\.json: not a JSON object"):
        D.data_format(str(tmp_path))


def test_held_out_problems_are_never_training_data() -> None:
    held = D.heldout_problems(40, seed=5)
    assert all(len(v) == 40 for v in held.values())
    rng = random.Random(1)
    names = D.proper_nouns(["Perth and Krakow met Anna Smith; Anna Smith left Perth for Lyon and Lyon."])
    assert names == ["Anna", "Lyon", "Smith"]  # seen twice, the held-out cities left out
    kinds = ("arith", "tool", "json", "copy") * 700
    texts = [t for k in kinds if (t := D.synthetic(rng, k, names)) is not None]
    user = "\n".join(re.findall(r"<｜User｜>(.*?)<｜Assistant｜>", "".join(texts)))
    for a, op, b in held["arith"]:
        assert not re.search(rf"(?<!\d){a} \{op} {b}(?!\d)", user), (a, op, b)
    for city in D.HELDOUT_CITIES:
        assert city not in user
    assert len(texts) > 2500  # about 1 in 10 arithmetic and JSON problems held out


def test_trained_vocabulary_keeps_specials_and_single_digits() -> None:
    rng = random.Random(2)
    texts = [t for k in ("arith", "tool", "json") * 60 if (t := D.synthetic(rng, k)) is not None]
    vocab = D.train_vocab(texts, 600)
    assert vocab.n_tokens <= 600
    tok = DSV4Tokenizer(vocab)
    chat = D.render_chat([{"role": "user", "content": "What is 417 + 285?"}], gen=True)
    ids = tok.tokenize(chat.encode(), add_bos=False, special=True)
    for special in ("<｜begin▁of▁sentence｜>", *CHAT_TOKENS[:2], "</think>"):
        assert vocab.id_of(special) in ids, special
    assert tok.detokenize(ids, special=True).decode() == chat
    digits = [vocab.tokens[i] for i in tok.tokenize(b"417285", add_bos=False)]
    assert digits == list("417285")


def test_a_name_after_a_space_is_the_tokens_a_tool_call_writes() -> None:
    """With split_capitals no merge joins a space to a capital letter: ` JPY` in a request is `Ġ` then the very
    tokens of `JPY` in the call's argument, so copying a code or a city is repeating tokens; words in lower case
    keep their space. Without it (the shipped demo model's vocabulary) ` JPY` is a token of its own."""
    rng = random.Random(6)
    texts = [t for k in ("arith", "tool", "json") * 60 if (t := D.synthetic(rng, k)) is not None]
    plain_vocab = D.train_vocab(texts, 600)
    plain = DSV4Tokenizer(plain_vocab)
    spaced = plain.tokenize(b" JPY", add_bos=False)
    assert spaced != [plain_vocab.id_of("\u0120"), *plain.tokenize(b"JPY", add_bos=False)], spaced
    vocab = D.train_vocab(texts, 600, split_capitals=True)
    tok = DSV4Tokenizer(vocab)
    assert vocab.n_tokens == 600  # the dropped merges are made up from further down the trainer's list
    space = vocab.id_of("\u0120")
    for name in ("JPY", "SEK", "Krakow", "Qwzxkvillo"):
        bare = tok.tokenize(name.encode(), add_bos=False)
        assert tok.tokenize(b" " + name.encode(), add_bos=False) == [space, *bare], name
    assert len(tok.tokenize(b" is", add_bos=False)) == 1
    assert not any(m.startswith("\u0120 ") and "A" <= m[2] <= "Z" for m in vocab.merges)


def test_copy_weights_mark_what_is_copied_from_the_request() -> None:
    rng = random.Random(3)
    texts = [t for k in ("arith", "tool", "json") * 40 if (t := D.synthetic(rng, k)) is not None]
    vocab = D.train_vocab(texts, 600)
    tok = DSV4Tokenizer(vocab)
    msgs, _ = D.weather_messages("Qwzxkvillo", random.Random(4))
    ids = tok.tokenize(D.render_chat(msgs, tools=D.TOOLS).encode(), add_bos=False, special=True)
    user, assistant = vocab.id_of("<｜User｜>"), vocab.id_of("<｜Assistant｜>")
    mask = D.assistant_mask(ids, assistant, vocab.eos_id)
    w = D.copy_weights(ids, mask, 4, user)
    assert [bool(x) for x in w] == [bool(x) for x in mask]  # the targets stay the targets
    assert set(w) == {0, 1, 4}
    heavy = tok.detokenize([t for t, x in zip(ids, w, strict=True) if x == 4]).decode()
    city = tok.tokenize(b"Qwzxkvillo", add_bos=False)
    assert len(city) > 2  # a name the vocabulary splits
    # every piece of the city after its first, in the call and in the answer, is weighted; no DSML markup is
    rest = tok.detokenize(city[1:]).decode()
    assert heavy.count(rest) == 2, heavy
    assert "DSML" not in heavy and "get_weather" not in heavy
    assert D.copy_weights(ids, mask, 4, -1) == mask  # no user turn: nothing copied


def test_copy_probe_targets_what_a_call_copies_from_the_request() -> None:
    rng = random.Random(5)
    texts = [t for k in ("arith", "tool", "json") * 40 if (t := D.synthetic(rng, k)) is not None]
    tok = DSV4Tokenizer(D.train_vocab(texts, 600))
    probe = D.copy_probe(tok, 19)
    cities = [x for x in probe if x["kind"] == "city"]
    currency = [x for x in probe if x["kind"] == "currency"]
    assert len(cities) == len(D.PROBE_CITIES) and len(currency) == 16
    for item, city in zip(cities, D.PROBE_CITIES, strict=True):  # a city's pieces after its first, in the call
        pieces = tok.tokenize(city.encode(), add_bos=False)
        assert tok.detokenize([item["ids"][t] for t in item["targets"]]).decode() == tok.detokenize(pieces[1:]).decode()
    for item in currency:  # the from and to codes of a held-out conversion, as the call writes them
        text = tok.detokenize(item["ids"], special=True).decode()
        codes = re.search(r"(?:Convert|much is|What is|convert) \d+ ([A-Z]{3}) (?:to|in|into) ([A-Z]{3})", text)
        assert codes is not None, text
        assert "".join(tok.detokenize([item["ids"][t]]).decode() for t in item["targets"]) == "".join(codes.groups())
        amount = int(re.search(r"\d+", codes.group(0)).group(0))
        assert D.tool_is_heldout(("currency", amount, *codes.groups()))
    subs = [x for x in probe if x["kind"] == "sub"]
    assert len(subs) == 16
    for item in subs:  # every digit the answer writes, the working and "So a - b = c", of a held-out subtraction
        text = tok.detokenize(item["ids"], special=True).decode()
        a, b, ans = map(int, re.search(r"So (\d+) - (\d+) = (-?\d+)", text).groups())
        assert D.heldout(a, "-", b) and ans == a - b
        answer = text[text.rindex("<｜Assistant｜>") :]
        digits = "".join(tok.detokenize([item["ids"][t]]).decode() for t in item["targets"])
        assert digits == "".join(c for c in answer if c.isdigit()), (digits, answer)
    # a subtraction counts whole (one wrong digit is a wrong answer); a city or a code by its tokens
    assert D.probe_score("sub", [True, False, True]) == (0, 1) and D.probe_score("sub", [True] * 3) == (1, 1)
    assert D.probe_score("city", [True, False, True]) == (2, 3)


@pytest.mark.parametrize("flag", [["--subtraction", "plain"], ["--subtraction", "borrow"], ["--sub-compare"]])
def test_probe_only_refuses_a_subtraction_form(
    flag: list[str], tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train.data --probe-only` takes the form from OUT/format.json (the probe must match the data it probes): any
    --subtraction given, the default's name included, is an argparse error naming why, and nothing is written."""
    monkeypatch.setattr(sys, "argv", ["train.data", "--out", str(tmp_path), "--probe-only", *flag])
    with pytest.raises(SystemExit) as e:
        D.main()
    assert e.value.code == 2
    assert "takes the subtraction form from OUT/format.json" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
