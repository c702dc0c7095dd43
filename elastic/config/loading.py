"""Reading a job spec: YAML file or dict, CLI overrides merged in, validated into a :class:`JobSpec`."""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from elastic.config.errors import ConfigError, errors_of
from elastic.config.job import JobSpec


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a job spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "parse error"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None


def _check_mapping(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        raise ConfigError(f"{source}: the job spec is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the job spec must be a mapping of keys to values (got {type(data).__name__})")
    return dict(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["workers.max=8", "optimizer.lr=0.05"]`` -> ``{"workers.max": 8, "optimizer.lr": 0.05}``.

    Values are read as YAML scalars/flow collections (``8`` is an int, ``[1, 2]`` a list).
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. workers.max=8")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return overrides


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (dotted keys or nested dicts) into a copy of ``data``."""
    merged = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = str(key).split(".")
        target = merged
        for depth, part in enumerate(parts[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
            target = child
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(target.get(leaf), dict):
            target[leaf] = _apply_overrides(target[leaf], value)
        else:
            target[leaf] = copy.deepcopy(value)
    return merged


def _validate(data: Mapping[str, Any]) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(errors_of(exc)) from None


def parse_job_spec(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Validate a job spec given as a dict (e.g. an ElasticJob's ``spec.job``).

    Raises:
        ConfigError: one line (the first problem); ``.errors`` lists them all.
    """
    spec = _check_mapping(data, "<job spec>")
    return _validate(_apply_overrides(spec, overrides) if overrides else spec)


def load_job_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and validate a YAML job spec; ``overrides`` (``{"workers.max": 8}``) win over the file.

    Raises:
        ConfigError: one line naming the field path and the allowed values; ``.errors`` lists all.
    """
    path = Path(path)
    spec = _check_mapping(_read_yaml(path), str(path))
    return _validate(_apply_overrides(spec, overrides) if overrides else spec)


def validate_job_spec(path: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Every problem of a job spec (a YAML path, or a dict), one line each, field path first; [] if valid."""
    try:
        if isinstance(path, Mapping):
            parse_job_spec(path, overrides)
        else:
            load_job_spec(path, overrides)
    except ConfigError as exc:
        return exc.errors
    return []
