"""`python -m llama_cpp.server` (under the alias) or `python -m llama_dsv4.compat.server`: llama-cpp-python's server
command line, served by llama-dsv4's server.

The flags are llama-cpp-python 0.3.36's: one per setting, spelled as the setting (`--n_ctx 4096`, booleans with a
value: `--use_mlock false`, lists as several values, objects as JSON), or `--config_file` with a JSON or YAML file
of server settings and a list of models (`$CONFIG_FILE` wins over the flag, and the file over the other flags).
Settings not on the command line come from environment variables of the same name, and `$HOST` / `$PORT` win
over everything, as there. A bad flag, value or config file is a one-paragraph error and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import typing
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from ...server.models import Model
from ...server.settings import SettingsError
from .mapping import model_config, read_bounded
from .settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings, env_values

PROG = "python -m llama_cpp.server"
MAX_CONFIG_BYTES = 256 << 10  # a config file's size (a real one lists a few models in a few KB; 256 KiB of YAML
# takes some 0.5 s and 40 MB to parse with libyaml)
MAX_CONFIG_NODES = 20_000  # values in a parsed config file (YAML aliases can make a small file huge)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SettingsError(message.replace("unrecognized arguments", "unknown argument(s)"))


def _bool() -> Any:
    def conv(s: str) -> bool:
        v = s.strip().lower()
        if v in ("1", "on", "t", "true", "y", "yes"):
            return True
        if v in ("0", "off", "f", "false", "n", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")

    return conv


def _scalar(kind: type) -> Any:
    def conv(s: str) -> Any:
        try:
            return kind(s)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None

    return conv


def _json_object() -> Any:
    def conv(s: str) -> dict[str, Any]:
        try:
            v = json.loads(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return v

    return conv


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the scalar type a flag's values have, whether it takes a list) for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        return _base_type(args[0])[0], True
    if origin is dict:
        return dict, False
    if origin is typing.Literal:
        return type(args[0]), False
    if args:  # Optional[X], X | Y: the first one (numa: bool | int takes a boolean, as there)
        return _base_type(args[0])
    return annotation, False


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="llama-cpp-python's server command line, served by llama-dsv4 (its flags and config files).",
        epilog="Unset settings come from environment variables of the same name. See docs/compat.md.",
    )
    for name, info in Settings.model_fields.items():
        flag = f"--{name}"
        kind, many = _base_type(info.annotation)
        if kind is bool:
            conv = _bool()
        elif kind is dict:
            conv = _json_object()
        elif kind in (int, float):
            conv = _scalar(kind)
        else:
            conv = str
        default = "" if info.is_required() else f" (default: {info.default})"
        p.add_argument(flag, dest=name, type=conv, nargs="*" if many else None, help=f"{info.description}{default}")
    p.add_argument("--config_file", help="a JSON or YAML file of server settings and models ($CONFIG_FILE wins)")
    return p


def _problem(e: ValidationError, source: str) -> SettingsError:
    """A pydantic error as one line per problem, naming where it is."""
    lines = []
    for err in e.errors()[:5]:
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), list(Settings.model_fields), 1)
            msg = "unknown setting" + (f" (did you mean {near[0]}?)" if near else "")
        lines.append(f"{where}: {msg}")
    more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return SettingsError(f"{source}: " + "; ".join(lines) + more)


def _count_nodes(value: Any, path: str) -> None:
    """Refuse a parsed config past MAX_CONFIG_NODES values or nested past 100 (YAML aliases repeat a subtree)."""
    seen = 0
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES or depth > 100:
            raise SettingsError(f"config file {path}: too large or nested too deeply for a list of models")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for pair in v.items() for x in pair)
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def load_config_file(path: str) -> ConfigFileSettings:
    """A config file (JSON, or YAML for .yaml / .yml) as llama-cpp-python reads it; SettingsError on anything
    wrong with it, naming the file and the place."""
    data = read_bounded(path, MAX_CONFIG_BYTES, f"config file {path}", f"{MAX_CONFIG_BYTES >> 10} KiB")
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise SettingsError(f"config file {path}: YAML needs PyYAML (pip install pyyaml)") from None
            parsed = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # safe_load, in C
        else:
            parsed = json.loads(data)
    except SettingsError:
        raise
    except RecursionError:
        raise SettingsError(f"config file {path}: nested too deeply") from None
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise SettingsError(f"config file {path}: not valid {_kind(path)} ({_first_line(e)})") from None
    _count_nodes(parsed, path)
    if not isinstance(parsed, dict):
        raise SettingsError(f"config file {path}: the top level must be an object of settings with a 'models' list")
    try:
        config = ConfigFileSettings.model_validate(parsed)
    except ValidationError as e:
        raise _problem(e, f"config file {path}") from None
    if not config.models:
        raise SettingsError(f"config file {path}: 'models' lists no model")
    return config


def _kind(path: str) -> str:
    return "YAML" if path.endswith((".yaml", ".yml")) else "JSON"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _given(ns: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if v is not None and k in cls.model_fields}


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> tuple[list[Model], list[str]]:
    """llama-cpp-python's server command line -> (our models, the first being the default; notes for the log).
    Raises SettingsError on anything that cannot be honoured; --help exits (SystemExit)."""
    env = dict(os.environ) if environ is None else environ
    ns = build_parser().parse_args(argv)
    notes: list[str] = []
    config_file = env.get("CONFIG_FILE") or ns.config_file
    try:
        if config_file:
            config = load_config_file(config_file)
            server: ServerSettings = config
            models: list[ModelSettings] = config.models
            ignored = sorted(_given(ns, Settings))
            if ignored:
                notes.append(f"--config_file given: {', '.join('--' + k for k in ignored)} ignored (as there)")
        else:
            if ns.model is None and not any(k.lower() == "model" for k in env):
                raise SettingsError("no model: pass --model FILE.gguf or --config_file FILE")
            server = _validated(ServerSettings, {**env_values(ServerSettings, env), **_given(ns, ServerSettings)})
            models = [_validated(ModelSettings, {**env_values(ModelSettings, env), **_given(ns, ModelSettings)})]
    except ValueError as e:  # SettingsError, or an environment variable that is not JSON
        raise SettingsError(str(e)) from None
    for var, field in (("HOST", "host"), ("PORT", "port")):  # these win over the flags and the file, as there
        if var in env:
            values = {k: getattr(server, k) for k in ServerSettings.model_fields}
            server = _validated(ServerSettings, {**values, field: env[var]}, f"${var}")
    out = [model_config(m, server) for m in models]
    names = [m.name for m in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SettingsError(f"two models are named {dup!r}: give each its own model_alias")
    return out, notes


def _validated(cls: type[Any], values: dict[str, Any], source: str = "the command line or the environment") -> Any:
    """`cls` from `values` (the environment already in them: validating does not read it)."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise _problem(e, source) from None


def main(argv: list[str] | None = None) -> int:
    """Run the server; the exit status (2: a bad command line or config file, 1: the model failed to load)."""
    try:
        models, notes = parse(argv)
    except SettingsError as e:
        print(f"{PROG}: error: {e}\n({PROG} --help lists the flags)", file=sys.stderr)
        return 2
    from ...server.serve import serve

    return serve(models, notes)
