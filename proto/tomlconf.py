"""Typed TOML configuration: dataclasses in, unknown keys out.

Each program (edge, hub, trainer) declares its config as nested dataclasses whose fields carry a
``doc`` in their metadata (use :func:`field`). :func:`load` parses TOML, rejects unknown keys by
name, checks types and applies ``validate()`` hooks; :func:`describe` renders the documentation that
``--print-config-doc`` shows and docs/ embeds. Pure Python 3.8+, no third-party imports beyond tomli
on Python < 3.11; hub and trainer reuse it (docs/adr/0002-shared-config-loader.md).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from proto.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the Python 3.8 device run
    import tomli as tomllib

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with documentation. Pass ``factory`` for mutable defaults."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def check_positive(obj: object, *names: str) -> None:
    """For ``validate()`` hooks: ValueError naming the first of ``names`` that is not > 0."""
    for n in names:
        if not getattr(obj, n) > 0:
            raise ValueError(f"{n} must be > 0, not {getattr(obj, n)!r}")


def check_not_negative(obj: object, *names: str) -> None:
    """For ``validate()`` hooks: ValueError naming the first of ``names`` that is not >= 0 (NaN fails too)."""
    for n in names:
        if not getattr(obj, n) >= 0:
            raise ValueError(f"{n} must be >= 0, not {getattr(obj, n)!r}")


def _args(tp: Any) -> tuple:
    return tuple(getattr(tp, "__args__", ()) or ())


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp) if hasattr(typing, "get_origin") else getattr(tp, "__origin__", None)


def table_type(tp: Any) -> Optional[Tuple[Any, str]]:
    """(dataclass, how) when ``tp`` declares a TOML table: ``("table", C)`` for ``C``, ``"optional"`` for
    ``Optional[C]`` (absent = None), ``"array"`` for ``List[C]`` (an array of tables, ``[[key]]``); else None."""
    if dataclasses.is_dataclass(tp):
        return tp, "table"
    origin = _origin(tp)
    args = [a for a in _args(tp) if a is not type(None)]
    if origin is Union and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], "optional"
    if origin in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0], "array"
    return None


def _type_name(tp: Any) -> str:
    origin = _origin(tp)
    if origin is Union:
        args = [a for a in tp.__args__ if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " (optional)"
    if origin in (list, List):
        return f"list of {_type_name(tp.__args__[0])}"
    if origin in (dict, Dict):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = getattr(tp, "__origin__", None)
    if origin is Union:
        args = [a for a in tp.__args__ if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin in (list, List):
        if isinstance(value, Mapping) and dataclasses.is_dataclass(tp.__args__[0]):
            raise ConfigError(f"{where}: expected an array of tables ([[{where}]], one per entry), "
                              f"got one table ([{where}])")
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, tp.__args__[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _convert(v, tp.__args__[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: Type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key '{where + '.' if where else ''}{unknown[0]}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{where or 'config'}: {exc}") from exc
    return obj


def from_dict(cls: Type[T], data: Mapping[str, Any]) -> T:
    return _build(cls, data, "")


def load(cls: Type[T], path: Union[str, Path, None]) -> T:
    """Load ``path`` (or the embedded defaults when None) into ``cls``; ConfigError on any problem."""
    if path is None:
        return from_dict(cls, {})
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def describe(cls: Type[Any], prefix: str = "", _seen: Optional[Dict[Any, str]] = None) -> List[str]:
    """Markdown lines documenting every field: key, type, default, doc. A table is a ``### [key]``
    heading (``Optional[C]``: may be left out; ``List[C]``: an array of tables, ``### [[key]]``); an array
    of the same tables as one documented before refers back to it instead of repeating its keys."""
    lines: List[str] = []
    seen: Dict[Any, str] = {} if _seen is None else _seen
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        table = table_type(tp)
        if table is not None:
            sub, how = table
            lines.append(f"\n### [[{key}]]\n" if how == "array" else f"\n### [{key}]\n")
            doc = f.metadata.get("doc", "")
            if doc:
                lines.append(doc + "\n")
            if how == "array" and sub in seen:
                lines.append(f"Each `[[{key}]]` table takes the keys of `[{seen[sub]}]` above.")
                continue
            seen.setdefault(sub, key)
            lines.extend(describe(sub, key + ".", seen))
            continue
        if f.default is not dataclasses.MISSING:
            default: Optional[str] = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = None
        lines.append(
            f"- `{key}` ({_type_name(tp)}, default {default if default is not None else 'required'}): "
            f"{f.metadata.get('doc', '')}"
        )
    return lines
