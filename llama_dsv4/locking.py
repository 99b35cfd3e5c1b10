"""`SequenceLock`: who may use a sequence now.

One completion, generation or state call runs on a sequence at a time. Three ways in:

- `exclusive()`: a whole completion or generation. Other threads wait; the thread that already holds the sequence
  (two interleaved streams in one thread) gets a RuntimeError instead of a corrupted sequence.
- `serial()`: one call (eval, reset, save_state, load_state). Other threads' work finishes first; the holder
  itself goes on (a completion calls these), except that a call changing the sequence while one of the holder's
  streams waits for its caller is refused: the stream would go on from another sequence.
- `relay(gen)`: a generator run under `exclusive()`, item by item. While the caller has an item the stream is
  paused; when it is resumed (perhaps by another thread, as a server's worker pool does) the resuming thread
  becomes the holder.

`on_exclusive(held)` is told when an exclusive hold starts (True) and ends (False): the engine's batcher waits
briefly for the calls of sequences that a completion is running on (runner.Runner.set_active).

The engine's own lock (runner.Runner.lock) is separate: it is held only while the engine computes or copies
state, so that closing a Llama waits for a computation without waiting for a paused stream.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


class SequenceLock:
    """The lock protocol of one sequence (module docstring)."""

    def __init__(self, on_exclusive: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._on_exclusive = on_exclusive
        self.owner: int | None = None  # the thread holding the sequence
        self.stream_paused = False  # a stream of the owner waits for its caller
        self.closed = False  # set when the sequence is closed: calls say "closed" rather than "stream open"

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the sequence for a whole completion or generation (module docstring)."""
        me = threading.get_ident()
        if self.owner == me:
            raise RuntimeError(
                "another completion on this Llama is still running in this thread (finish or close its stream first)"
            )
        with self._hold(me):
            if self._on_exclusive is None:
                yield
                return
            self._on_exclusive(True)
            try:
                yield
            finally:
                self._on_exclusive(False)

    @contextlib.contextmanager
    def serial(self, changes_sequence: bool = True) -> Iterator[None]:
        """Hold the sequence for one call, or go on within the holder's own work (module docstring)."""
        me = threading.get_ident()
        if self.owner == me:
            if changes_sequence and self.stream_paused and not self.closed:
                raise RuntimeError(
                    "a stream (generate() or create_completion(stream=True)) of this Llama is open in this thread: "
                    "finish or close it before eval(), reset() or load_state()"
                )
            yield
            return
        with self._hold(me):
            yield

    def relay(self, inner: Generator[_T, Any, None]) -> Generator[_T, Any, None]:
        """Hand `inner`'s items (and what the caller sends back) through, holding the sequence until `inner` ends or
        the returned generator is closed."""
        with self.exclusive():
            try:
                sent = None
                while True:
                    try:
                        item = inner.send(sent)
                    except StopIteration:
                        return
                    self.stream_paused = True
                    try:
                        sent = yield item
                    finally:
                        self.owner = threading.get_ident()  # resumed, perhaps by another thread
                        self.stream_paused = False
            finally:
                inner.close()

    @contextlib.contextmanager
    def _hold(self, me: int) -> Iterator[None]:
        with self._lock:
            self.owner = me
            try:
                yield
            finally:
                self.owner = None
