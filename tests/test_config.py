from dataclasses import dataclass, field

import pytest
import yaml

from omni_model.config import apply_overrides, load_config, save_config


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    tags: tuple = ()


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ninner:\n  lr: 0.01\n")
    cfg = load_config(Outer, path, ["inner.steps=20", "maybe.lr=2e-5", "tags=[a, b]"])
    assert cfg == Outer("base", Inner(0.01, 20), Inner(2e-5, 10), ("a", "b"))
    assert load_config(Outer, None) == Outer()


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(KeyError, match="inner.stepz"):
        load_config(Outer, None, ["inner.stepz=3"])
    with pytest.raises(ValueError):
        apply_overrides({}, ["no_equals_sign"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["inner.lr=0.5", "name=run"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, path) == cfg
    assert yaml.safe_load(path.read_text())["inner"]["lr"] == 0.5


@dataclass(frozen=True)
class Item:
    name: str = "a"
    weight: float = 1.0


@dataclass(frozen=True)
class WithItems:
    items: tuple[Item, ...] = ()


def test_sequences_of_dataclasses(tmp_path):
    cfg = load_config(WithItems, None, ["items=[{name: b, weight: 2e-1}, {name: c}]"])
    assert cfg.items == (Item("b", 0.2), Item("c", 1.0))
    path = save_config(cfg, tmp_path / "r.yaml")
    assert load_config(WithItems, path) == cfg
