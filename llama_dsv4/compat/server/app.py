"""`llama_cpp.server.app.create_app` under the alias: llama-cpp-python's way to make the server's ASGI app in code
or with `uvicorn --factory llama_cpp.server.app:create_app` (settings from the environment, or $CONFIG_FILE)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ...server.models import ModelSet
from .cli import load_config_file
from .mapping import model_config
from .settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings

log = logging.getLogger("llama_dsv4.server")


def _part(cls: type[Any], settings: Settings) -> Any:
    """The fields of `cls` in `settings`, those that were given staying the given ones."""
    return cls.model_validate({k: getattr(settings, k) for k in settings.model_fields_set if k in cls.model_fields})


def create_app(
    settings: Settings | None = None,
    server_settings: ServerSettings | None = None,
    model_settings: list[ModelSettings] | None = None,
) -> Any:
    """The FastAPI app of llama-dsv4's server over llama-cpp-python's settings, with the first model loaded (as
    llama-cpp-python's create_app: $CONFIG_FILE first, then server_settings + model_settings, then `settings`,
    else Settings() from the environment). Raises ValueError (SettingsError) for settings it cannot honour."""
    from ...server.app import create_app as server_app
    from ...server.metrics import Metrics
    from ...server.slots import SlotPool, load_slots

    config_file = os.environ.get("CONFIG_FILE")
    if config_file:
        config: ConfigFileSettings = load_config_file(config_file)
        server_settings, model_settings = config, config.models
    if server_settings is None and model_settings is None:
        settings = settings if settings is not None else Settings()
        server_settings, model_settings = _part(ServerSettings, settings), [_part(ModelSettings, settings)]
    if server_settings is None or not model_settings:
        raise ValueError("create_app needs server_settings and model_settings together (or settings)")
    models = [model_config(m, server_settings) for m in model_settings]
    for model in models:
        for note in model.settings.notes:
            log.warning("model %r: %s", model.name, note)
    llamas, notes = load_slots(models[0].settings)
    for note in notes:
        log.warning("%s", note)
    pool = SlotPool(llamas)
    return server_app(models[0].settings, pool, Metrics(), ModelSet(models, pool))
