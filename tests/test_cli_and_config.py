"""The configuration system and the `musar` command, including the README's demo."""

from dataclasses import dataclass, field

import pytest
from PIL import Image

from musar.cli import main
from musar.config import ConfigError, dump_yaml, load_config
from musar_core import MusarConfig


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Job:
    steps: int = 10
    out: str | None = None
    inner: Inner = field(default_factory=Inner)
    musar: MusarConfig = field(default_factory=MusarConfig)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 3\ninner:\n  rate: 2\nmusar:\n  subject_rank: 64\n")
    cfg = load_config(Job, path, ["inner.names=[a, b]", "musar.dynamic_routing=false", "out=x"])
    assert cfg.steps == 3 and cfg.inner.rate == 2.0 and cfg.inner.names == ["a", "b"] and cfg.out == "x"
    assert cfg.musar.subject_rank == 64 and cfg.musar.dynamic_routing is False
    assert load_config(Job, None, []) == Job()
    assert "subject_rank: 64" in dump_yaml(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stepz=3"], "unknown field.*stepz"),
        (["steps=three"], "steps: expected an integer"),
        (["inner.rate=[1]"], "inner.rate: expected a number"),
        (["musar.subject_rank=0"], "musar: MusarConfig.subject_rank must be a positive integer"),
        (["musar.static_routing=false", "musar.isolate_conditions=true"], "isolate_conditions"),
        (["steps"], "dotted.key=value"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Job, None, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")


def test_cli_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2 and "unknown command" in capsys.readouterr().err


def test_scalar_fields_become_flags(capsys):
    assert main(["demo", "--steps", "3", "--prompt", "a: b", "--print-config", "musar.subject_rank=8"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "subject_rank: 8" in out and "prompt: 'a: b'" in out


def test_cli_config_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "steps=many"])
    assert exit_info.value.code == 2
    assert "steps: expected an integer" in capsys.readouterr().err


def test_demo_writes_an_image(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSAR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", f"output_dir={out}", "steps=2", "height=64", "width=64"]) == 0
    image = Image.open(out / "generated.png")
    assert image.size == (64, 64)
    assert Image.open(out / "sheet.png").size == (3 * 64, 64)
    assert (out / "routing_map.png").exists()
    assert "wrote" in capsys.readouterr().out


def test_demo_rejects_a_phrase_missing_from_the_prompt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "prompt=a cat", "steps=1", "height=64", "width=64", f"output_dir={tmp_path}"])
    assert exit_info.value.code == 1
    assert "subject phrase 'red ball' does not occur in the prompt" in capsys.readouterr().err
