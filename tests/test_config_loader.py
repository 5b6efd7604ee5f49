"""The typed config loader and the edge config: unknown keys named, types checked, docs complete."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import pytest

from edge import config
from proto import tomlconf
from proto.errors import ConfigError


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
    ('[model]\nthreads = -1\n', "threads must be 0"),
    ('[model]\nthreads = 65\n', "threads must be 0"),
    ('[source]\nkind = "v4l2"\npreset = "csi"\n', "preset is for kind"),
    ('[source]\nkind = "gstreamer"\npreset = "webcam"\n', "unknown preset 'webcam'"),
    ('[source]\nkind = "gstreamer"\n', "needs uri or preset"),
    ('[source]\nkind = "gstreamer"\npreset = "csi"\nuri = "/dev/video0"\n', "uri is the camera's sensor id"),
    ('[telemetry]\ntegrastats_interval_ms = 10\n', "tegrastats_interval_ms must be 100..60000"),
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
    import typing

    text = config.describe()
    hints = typing.get_type_hints(config.EdgeConfig)
    for section in dataclasses.fields(config.EdgeConfig):
        table = tomlconf.table_type(hints[section.name])
        assert table is not None, f"{section.name} is not a table"
        sub, how = table
        assert section.metadata.get("doc"), f"[{section.name}] has no doc"
        if how == "array":  # [[sources]]: the keys of [source], documented once
            assert f"### [[{section.name}]]" in text
            assert f"Each `[[{section.name}]]` table takes the keys of `[source]` above." in text
            continue
        for f in dataclasses.fields(sub):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"
            assert f"`{section.name}.{f.name}`" in text


def test_describe_shows_defaults() -> None:
    @dataclasses.dataclass
    class C:
        n: int = tomlconf.field(5, doc="a number")

    assert tomlconf.describe(C) == ["- `n` (int, default 5): a number"]


@dataclasses.dataclass
class Plain:
    name: str = tomlconf.field("c", doc="its name")


@dataclasses.dataclass
class Top:  # the annotations must resolve at module level (typing.get_type_hints)
    one: Optional[Plain] = tomlconf.field(None, doc="one camera")
    many: List[Plain] = tomlconf.field(doc="several", factory=list)


def test_optional_tables_and_arrays_of_tables() -> None:
    assert tomlconf.describe(Top) == ["\n### [one]\n", "one camera\n", "- `one.name` (str, default 'c'): its name",
                                      "\n### [[many]]\n", "several\n",
                                      "Each `[[many]]` table takes the keys of `[one]` above."]
    got = tomlconf.from_dict(Top, {"many": [{"name": "a"}, {"name": "b"}]})
    assert got.one is None and [c.name for c in got.many] == ["a", "b"]
    assert tomlconf.from_dict(Top, {"one": {"name": "x"}}).one == Plain("x")
    with pytest.raises(ConfigError, match=r"many\[1\]: expected a table"):
        tomlconf.from_dict(Top, {"many": [{"name": "a"}, 3]})
    with pytest.raises(ConfigError, match=r"expected an array of tables \(\[\[many\]\]"):
        tomlconf.from_dict(Top, {"many": {"name": "a"}})


def test_limit_checks() -> None:
    @dataclasses.dataclass
    class L:
        a: float = 1.0
        b: float = 0.0

    tomlconf.check_positive(L(), "a")
    tomlconf.check_not_negative(L(), "a", "b")
    with pytest.raises(ValueError, match="b must be > 0, not 0.0"):
        tomlconf.check_positive(L(), "a", "b")
    with pytest.raises(ValueError, match="a must be >= 0, not nan"):
        tomlconf.check_not_negative(L(a=float("nan")), "a")


def test_generated_config_reference_is_current() -> None:
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "edge-config.md"
    assert page.exists(), "docs/edge-config.md is missing: run `python -m edge config-doc > docs/edge-config.md`"
    assert page.read_text() == config.describe(), (
        "docs/edge-config.md is stale: run `python -m edge config-doc > docs/edge-config.md`")


@pytest.mark.parametrize("body, msg", [
    ('[device]\nid = "$SYS"\n', "invalid id '$SYS'"),
    ('[device]\nid = "cam/1"\n', "invalid id 'cam/1'"),
    ('[device]\ngroup = "a/b"\n', "invalid group 'a/b'"),
    ('[device]\ngroup = ""\n', "invalid group ''"),
    ('[mqtt]\nport = 0\n', "port must be 1..65535"),
    ('[mqtt]\nport = 70000\n', "port must be 1..65535"),
    ('[mqtt]\nack_timeout_s = 0\n', "ack_timeout_s must be > 0"),
    ('[mqtt]\nkeepalive_s = 0\n', "keepalive_s must be 5..65535"),
    ('[mqtt]\nauth_retry_s = -1\n', "auth_retry_s must be > 0"),
    ('[mqtt]\nmax_send_attempts = 0\n', "max_send_attempts must be > 0"),
    ('[mqtt]\ncert_file = "c.pem"\n', "needs both cert_file and key_file"),
    ('[source]\nstall_timeout_s = 0\n', "stall_timeout_s must be > 0"),
    ('[source]\nmax_corrupt_in_row = 0\n', "max_corrupt_in_row must be > 0"),
    ('[sampler]\nmax_per_minute = -1\n', "max_per_minute must be >= 0"),
    ('[source]\nfps = nan\n', "fps must be >= 0, not nan"),
    ('[source]\ndecode_threads = -1\n', "decode_threads must be >= 0"),
    ('[sampler]\ndedup_window_s = 0\n', "dedup_window_s must be > 0"),
    ('[sampler]\ndedup_history = 0\n', "dedup_history must be > 0"),
    ('[sampler]\ndedup_distance = -2\n', "dedup_distance must be -1"),
    ('[spool]\nmax_frames = 0\n', "max_frames must be > 0"),
    ('[pipeline]\nsink_queue_size = 0\n', "sink_queue_size must be >= 1"),
    ('[telemetry]\nmetrics_port = 70000\n', "metrics_port must be 0..65535"),
    ('[telemetry]\ninterval_s = -5\n', "interval_s must be >= 0"),
])
def test_limits_and_names_are_validated(tmp_path, body: str, msg: str) -> None:
    p = tmp_path / "edge.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=msg.replace("$", r"\$").replace(".", r"\.")):
        config.load(p)
