"""The `llama-dsv4-server` command: parse the flags, load one Llama per slot, serve with uvicorn (`serve`, which
llama-cpp-python's command line in llama_dsv4.compat.server uses too)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from .models import Model
from .settings import SettingsError, parse_args

log = logging.getLogger("llama_dsv4.server")


def _logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llama-dsv4-server: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except SettingsError as e:
        print(f"llama-dsv4-server: error: {e}\n(llama-dsv4-server --help lists the flags)", file=sys.stderr)
        return 2
    return serve([Model(settings.model_name, settings)])


def serve(models: list[Model], notes: list[str] | None = None) -> int:
    """Load the first model and serve them all (see models.py) until Ctrl-C. The server's own settings (address,
    keys, limits) are the first model's; `notes` are logged first. Returns the exit status."""
    settings = models[0].settings
    _logging(settings.verbose)
    for note in notes or []:
        log.info("note: %s", note)
    for model in models:
        for note in model.settings.notes:
            log.info("note: %s", note if len(models) == 1 else f"model {model.name!r}: {note}")
    try:
        import uvicorn

        from .app import create_app, started_banner
        from .metrics import Metrics
        from .models import ModelSet
        from .protocol import protocol_class
        from .slots import SlotPool, load_slots
    except ImportError as e:  # a broken install: the server's dependencies are regular dependencies
        print(
            f"llama-dsv4-server: error: {e} (pip install llama-dsv4 installs FastAPI, uvicorn, sse-starlette)",
            file=sys.stderr,
        )
        return 1

    t0 = time.perf_counter()
    try:
        llamas, notes = load_slots(settings)
    except (ValueError, OSError) as e:
        print(f"llama-dsv4-server: error: {e}", file=sys.stderr)
        return 1
    for note in notes:
        log.info("note: %s", note)
    log.info("model loaded in %.1f s: %d slot(s) of %d tokens", time.perf_counter() - t0, len(llamas), llamas[0][1])
    pool = SlotPool(llamas, similarity=settings.slot_prompt_similarity)
    app = create_app(settings, pool, Metrics(), ModelSet(models, pool))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info" if settings.verbose else "warning",
        access_log=settings.verbose,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        timeout_graceful_shutdown=5,
        http=protocol_class(settings),  # h11 with a header deadline and a connection limit (protocol.py)
    )
    server = uvicorn.Server(config)
    log.info(started_banner(settings, [m.name for m in models]))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        server.run()
    log.info("stopped")
    if app.state.unfinished:  # a worker thread is inside a long prompt: do not wait for it at exit
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
