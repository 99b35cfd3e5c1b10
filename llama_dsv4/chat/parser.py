"""Splitting a DeepSeek V4 answer into reasoning, content and tool calls, incrementally (for streams) or at once.

    [reasoning] </think> [content] [<｜DSML｜tool_calls> ... </｜DSML｜tool_calls>]

With thinking on, the prompt ends in `<think>` and everything up to `</think>` is reasoning; an answer that starts
with `<think>` is read the same way. A tool-calls block is parsed into calls as each invoke completes. Text is
held back only while it may still turn out to be markup (a partial `</think>` or `<｜DSML｜tool_calls>`, or the
whitespace before it). Markup that does not parse is returned as content, never raised.
"""

from __future__ import annotations

from typing import Any

from .dsml import CALLS_CLOSE, CALLS_OPEN, INVOKE_CLOSE, parse_invoke

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
Event = tuple[str, Any]  # ("reasoning" | "content", str) or ("tool_call", (name, arguments))


def _partial(buf: str, marker: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


class OutputParser:
    def __init__(self, thinking: bool, tools: bool, raw: bool = False) -> None:
        self.raw = raw
        self.tools = tools and not raw
        self.state = "content" if raw else ("reasoning" if thinking else "start")
        self.buf = ""
        self.block = ""  # the tool-calls block read so far (in state "tools"), with the whitespace before it
        self.n_calls = 0
        self.cut = False  # the answer was cut (max_tokens): a partial block is dropped, not shown as content

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, "_" + self.state)(out, final=False)
            if (self.state, len(self.buf)) == before:
                return out

    def finish(self, cut: bool = False) -> list[Event]:
        """The events of what is held back. cut: the answer stopped at max_tokens, so an unfinished tool-calls
        block (or the start of its opening marker) is dropped: the calls completed before the cut are kept."""
        self.cut = cut
        out: list[Event] = []
        for _ in range(8):  # each state flushes and may hand over to the next
            getattr(self, "_" + self.state)(out, final=True)
            if not self.buf and self.state != "tools":
                break
        return [e for e in out if e[0] == "tool_call" or e[1]]

    # ---- states
    def _start(self, out: list[Event], final: bool) -> None:
        if self.buf.startswith(THINK_OPEN):
            self.buf = self.buf[len(THINK_OPEN) :]
            self.state = "reasoning"
        elif final or not THINK_OPEN.startswith(self.buf):
            self.state = "content"

    def _reasoning(self, out: list[Event], final: bool) -> None:
        i = self.buf.find(THINK_CLOSE)
        if i >= 0:
            out.append(("reasoning", self.buf[:i]))
            self.buf = self.buf[i + len(THINK_CLOSE) :]
            self.state = "content"
            return
        keep = 0 if final else _partial(self.buf, THINK_CLOSE)
        if len(self.buf) > keep:
            out.append(("reasoning", self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep :]

    def _content(self, out: list[Event], final: bool) -> None:
        if self.tools:
            i = self.buf.find(CALLS_OPEN)
            if i >= 0:
                head = self.buf[:i].rstrip()
                out.append(("content", head))
                self.block, self.buf = self.buf[len(head) : i + len(CALLS_OPEN)], self.buf[i + len(CALLS_OPEN) :]
                self.state = "tools"
                return
        keep = 0
        if self.tools and self.cut:  # final: the start of an opening marker that the cut stopped is not content
            self.buf = self.buf[: len(self.buf) - _partial(self.buf, CALLS_OPEN)].rstrip()
        elif self.tools and not final:
            keep = _partial(self.buf, CALLS_OPEN)
            keep += len(self.buf[: len(self.buf) - keep]) - len(self.buf[: len(self.buf) - keep].rstrip())
        if len(self.buf) > keep:
            out.append(("content", self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep :]

    def _tools(self, out: list[Event], final: bool) -> None:
        while True:
            stripped = self.buf.lstrip()
            if stripped.startswith(CALLS_CLOSE):
                self.buf = stripped[len(CALLS_CLOSE) :]
                self.block = ""
                self.state = "after"
                return
            end = self.buf.find(INVOKE_CLOSE)
            if end < 0:
                break
            chunk = self.buf[: end + len(INVOKE_CLOSE)]
            call = parse_invoke(chunk)
            if call is None:
                break
            out.append(("tool_call", call))
            self.n_calls += 1
            self.block += chunk
            self.buf = self.buf[end + len(INVOKE_CLOSE) :]
        if final:  # an unterminated or malformed block: what could not be parsed is content, unless it was cut
            rest = self.buf if self.n_calls else self.block + self.buf
            if not self.cut:
                out.append(("content", rest))
            self.buf, self.block = "", ""
            self.state = "after"

    def _after(self, out: list[Event], final: bool) -> None:
        if self.buf.strip():
            out.append(("content", self.buf))
        self.buf = ""


def parse(text: str, thinking: bool, tools: bool, raw: bool = False) -> tuple[str | None, str | None, list[Any]]:
    """(reasoning, content, calls) of a whole answer."""
    p = OutputParser(thinking, tools, raw)
    events = p.feed(text) + p.finish()
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"]
    return (reasoning or None) if not raw else None, content, calls
