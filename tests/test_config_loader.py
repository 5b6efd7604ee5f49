"""The typed config loader and the edge config: unknown keys named, types checked, docs complete."""

from __future__ import annotations

import dataclasses

import pytest

from edge import config, tomlconf
from edge.errors import ConfigError


def test_defaults_load_and_validate() -> None:
    cfg = config.load(None)
    assert cfg.sampler.strategies == ["confidence"]
    assert cfg.device.resolved_id


def test_unknown_key_is_named(tmp_path) -> None:
    p = tmp_path / "edge.toml"
    p.write_text('[sampler]\nconfidence_treshold = 0.5\n')
    with pytest.raises(ConfigError, match=r"unknown key 'sampler.confidence_treshold'"):
        config.load(p)


def test_unknown_section_is_named(tmp_path) -> None:
    p = tmp_path / "edge.toml"
    p.write_text('[camera]\nkind = "file"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'camera'"):
        config.load(p)


@pytest.mark.parametrize("body, msg", [
    ('[source]\nkind = "webcam"\n', "kind must be one of"),
    ('[source]\nkind = "file"\n', "needs uri"),
    ('[sampler]\nconfidence_threshold = 2.0\n', "within 0..1"),
    ('[mqtt]\nport = "1883"\n', "expected an integer"),
    ('[spool]\nfsync = 1\n', "expected true or false"),
    ('[model]\nthreads = 0\n', "threads must be 1..64"),
    ('[sampler]\nstrategies = ["confidence", "vibes"]\n', "unknown sampler strategy 'vibes'"),
    ('not toml at all = = =', "not valid TOML"),
])
def test_bad_values_have_clear_errors(tmp_path, body: str, msg: str) -> None:
    p = tmp_path / "edge.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=msg):
        config.load(p)


def test_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.toml")


def test_values_are_converted(tmp_path) -> None:
    p = tmp_path / "edge.toml"
    p.write_text('[device]\nid = "cam-7"\n[sampler]\nconfidence_threshold = 1\n')
    cfg = config.load(p)
    assert cfg.device.resolved_id == "cam-7"
    assert cfg.sampler.confidence_threshold == 1.0 and isinstance(cfg.sampler.confidence_threshold, float)


def _all_fields(cls):  # noqa: ANN001, ANN202
    for f in dataclasses.fields(cls):
        yield cls, f
        tp = f.type if not isinstance(f.type, str) else None
        if tp is not None and dataclasses.is_dataclass(tp):
            yield from _all_fields(tp)


def test_every_field_is_documented() -> None:
    text = config.describe()
    for section in dataclasses.fields(config.EdgeConfig):
        sub = getattr(config.EdgeConfig(), section.name)
        for f in dataclasses.fields(sub):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"
            assert f"`{section.name}.{f.name}`" in text


def test_describe_shows_defaults() -> None:
    @dataclasses.dataclass
    class C:
        n: int = tomlconf.field(5, doc="a number")

    assert tomlconf.describe(C) == ["- `n` (int, default 5): a number"]
