"""Finds, builds and validates the configured product stores.

Connector classes are plugins found by entry point (`allego_privacy.connectors`), so a
product team adds a store by shipping a package and a config table, without editing
the pipeline. Everything is checked when the stores are loaded (worker start), so a
broken mapping stops the worker with a message naming the store, the plugin and the
fix, instead of failing a person's request later.

Config format (TOML)::

    [stores.video]
    connector = "sql"                         # entry point name
    url = "sqlite:///{data_dir}/stores/video.db"
    mapping = "video.toml"                    # relative to this config file
"""

from __future__ import annotations

import dataclasses
import importlib
import tomllib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import structlog

from connectors.base import Capability, Connector, DataFacts, MappingError, StoreMetadata

log = structlog.get_logger()

ENTRY_POINT_GROUP = "allego_privacy.connectors"
DEFAULT_CONFIG = Path(__file__).parent / "allego" / "stores.toml"
BUILTIN_CONNECTORS: Mapping[str, str] = {
    "sql": "connectors.sql:SqlConnector",
    "files": "connectors.files:FilesConnector",
    "memory": "connectors.memory:MemoryConnector",
    "http": "connectors.http:HttpConnector",
}
REQUIRED_METHODS = ("locate", "export", "correct", "erase", "opt_out", "health", "close")
PATH_SETTINGS = ("mapping",)

ConnectorFactory = Callable[..., Connector]


def available_plugins() -> dict[str, str]:
    """Plugin name -> "module:attr"; installed entry points win over the built-ins."""
    plugins = dict(BUILTIN_CONNECTORS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugins[ep.name] = ep.value
    return plugins


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _substitute(value: Any, data_dir: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{data_dir}", str(data_dir))
    if isinstance(value, list):
        return [_substitute(v, data_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, data_dir) for k, v in value.items()}
    return value


def load_connectors(config_path: Path | None, data_dir: Path) -> dict[str, Connector]:
    """Build every configured store, validated; raise `MappingError` on the first problem."""
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MappingError(f"store config {path} does not exist; pass an existing file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"store config {path} is not valid TOML: {exc}") from exc
    stores = config.get("stores")
    if not isinstance(stores, dict) or not stores:
        raise MappingError(f"store config {path} declares no [stores.<name>] tables; add one")
    plugins = available_plugins()
    connectors: dict[str, Connector] = {}
    try:
        for name, raw in stores.items():
            connectors[name] = _load_one(name, raw, path, data_dir, plugins)
    except BaseException:
        close_all(connectors)
        raise
    log.info("connectors_loaded", stores=sorted(connectors))
    return connectors


def _load_one(
    name: str, raw: Any, config_path: Path, data_dir: Path, plugins: Mapping[str, str]
) -> Connector:
    if not isinstance(raw, dict):
        raise MappingError(f"store {name!r}: [stores.{name}] is not a table; declare it as one")
    plugin = raw.get("connector")
    if not isinstance(plugin, str) or not plugin:
        raise MappingError(
            f"store {name!r}: no `connector` is named; set connector = one of {sorted(plugins)}"
        )
    if plugin not in plugins:
        raise MappingError(
            f"store {name!r}: connector plugin {plugin!r} is not installed; use one of "
            f"{sorted(plugins)} or install the package that declares it under the "
            f"{ENTRY_POINT_GROUP!r} entry point group"
        )
    settings = _substitute({k: v for k, v in raw.items() if k != "connector"}, data_dir)
    for key in PATH_SETTINGS:
        value = settings.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            settings[key] = str((config_path.parent / value).resolve())

    def fail(problem: str) -> MappingError:
        prefix = f"store {name!r}: "
        problem = problem[len(prefix) :] if problem.startswith(prefix) else problem
        return MappingError(f"store {name!r} (connector plugin {plugin!r}): {problem}")

    try:
        cls = _import(plugins[plugin])
    except (ImportError, AttributeError) as exc:
        raise fail(f"cannot import {plugins[plugin]} ({exc}); check the entry point") from exc
    factory = getattr(cls, "from_config", None)
    if not callable(factory):
        raise fail(f"{plugins[plugin]} has no from_config(name, settings, data_dir) classmethod")
    try:
        connector = factory(name, settings, data_dir)
    except MappingError as exc:
        raise fail(str(exc)) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(
            f"settings are invalid ({type(exc).__name__}: {exc}); fix [stores.{name}]"
        ) from exc
    problems = validate_connector(connector, name)
    if problems:
        raise fail("; ".join(problems))
    return connector  # type: ignore[no-any-return]


def validate_connector(connector: Any, name: str) -> list[str]:
    """Everything wrong with a connector object, each with its fix; empty when valid."""
    problems: list[str] = []
    for attr in ("name", "capabilities", "metadata", "correctable_fields"):
        if not hasattr(connector, attr):
            problems.append(f"attribute `{attr}` is missing; set it in the connector")
    for method in REQUIRED_METHODS:
        if not callable(getattr(connector, method, None)):
            problems.append(f"method `{method}` is missing; implement it (see connectors.base)")
    if problems:
        return problems
    if connector.name != name:
        problems.append(f"its name is {connector.name!r}; it must be the store name {name!r}")
    caps = connector.capabilities
    if not isinstance(caps, frozenset) or not all(isinstance(c, Capability) for c in caps):
        problems.append("`capabilities` must be a frozenset of connectors.base.Capability")
    elif Capability.LOCATE not in caps:
        problems.append("it does not declare `locate`; every store must be searchable (R11)")
    elif Capability.CORRECT in caps and not connector.correctable_fields:
        problems.append("it declares `correct` but no correctable_fields; list them")
    if not isinstance(connector.correctable_fields, frozenset):
        problems.append("`correctable_fields` must be a frozenset of field names")
    metadata = connector.metadata
    if not isinstance(metadata, StoreMetadata):
        problems.append("`metadata` must be a connectors.base.StoreMetadata")
        return problems
    if not metadata.facts:
        problems.append("metadata.facts is empty; declare the Art. 15 facts of each table")
    for collection, facts in metadata.facts.items():
        if not isinstance(facts, DataFacts):
            problems.append(f"facts of {collection!r} are not a DataFacts")
            continue
        for f in dataclasses.fields(DataFacts):
            value = getattr(facts, f.name)
            empty = not value or (isinstance(value, tuple) and not all(value))
            if empty or (isinstance(value, str) and not value.strip()):
                problems.append(f"facts of {collection!r} leave `{f.name}` empty; fill it in")
    return problems


def close_all(connectors: Mapping[str, Connector]) -> None:
    """Close every store, even if some fail to close: a leaked pool beats a lost shutdown."""
    for name, connector in connectors.items():
        try:
            connector.close()
        except Exception as exc:  # noqa: BLE001 - shutdown must reach every store
            log.warning("connector_close_failed", store=name, error=type(exc).__name__)
