"""`llama-dsv4-server`: an OpenAI-compatible HTTP server (FastAPI + uvicorn + sse-starlette) over `Llama`, with
llama-server's command-line flags.

Modules: settings.py (flags -> Settings), slots.py (slots, queue, stoppable jobs), models.py (the models served by
name, one loaded at a time), app.py (the app over state.py's shared state and the routers of routes/), body.py,
generation.py and dispatch.py (a request read, its arguments, its job on a slot), schemas.py (request bodies),
errors.py (OpenAI error bodies), metrics.py (Prometheus text), serve.py (the command). llama-cpp-python's server
command line and config files are in llama_dsv4.compat.server.
"""

from .settings import Settings, SettingsError, parse_args

__all__ = ["Settings", "SettingsError", "create_app", "main", "parse_args"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """`app.create_app` (imported lazily: FastAPI is only needed when serving)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """The `llama-dsv4-server` command: parse llama-server's flags from `argv` (None: sys.argv[1:]), load the model
    and serve it until Ctrl-C. Returns the exit status (2 for bad flags)."""
    from .serve import main as _main

    return _main(argv)
