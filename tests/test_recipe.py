"""Pass configs: versioned JSON round trip, option parsing, the registry and plug-in passes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from zoo import ZOO

import surgeon
from surgeon import recipe
from surgeon.recipe import PassConfig, PassError, config_from_json, parse_pass, registered


@pytest.mark.parametrize("name", ["aion", "hyper", "adyt"])
def test_every_builtin_pass_round_trips_through_json(name: str) -> None:
    config = parse_pass(name)
    data = json.loads(json.dumps(config.to_json()))
    assert data["_type"] == name and data["_version"] == type(config).version
    assert config_from_json(data) == config


def test_options_are_typed_from_strings() -> None:
    config = parse_pass("hyper:streams=2,mhc=yes,reduce=sum,exclude=a.*|b")
    assert (config.streams, config.mhc, config.reduce) == (2, True, "sum")
    assert config.exclude == ("a.*", "b")
    with pytest.raises(PassError, match="expected an int"):
        parse_pass("hyper:streams=two")
    with pytest.raises(PassError, match="expected one of mean, sum"):
        parse_pass("hyper:reduce=max")
    with pytest.raises(PassError, match="not key=value"):
        parse_pass("hyper:streams")
    with pytest.raises(PassError, match="at least 2"):
        parse_pass("hyper:mhc=true,streams=1")


def test_a_newer_config_version_is_refused() -> None:
    data = parse_pass("aion").to_json()
    data["_version"] += 1
    with pytest.raises(PassError, match="newer than this surgeon"):
        config_from_json(data)
    with pytest.raises(PassError, match="not a pass config"):
        config_from_json({"_type": "aion"})


@dataclass(frozen=True)
class CountResiduals(PassConfig):
    """A plug-in pass: rewrites nothing, reports how many residual adds it saw."""

    name: ClassVar[str] = "count-residuals"
    seen: ClassVar[list[int]] = []

    def run(self, surgery) -> list[str]:  # noqa: ANN001
        self.seen.append(len(surgery.inspection.residuals))
        return []


class FakeEntryPoint:
    name, value = "count-residuals", "tests.plugin"

    def load(self) -> None:
        recipe.register(CountResiduals)


def test_a_plugin_pass_joins_through_the_entry_point_group(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(recipe, "_loaded", False)
    monkeypatch.setattr(recipe, "_REGISTRY", dict(recipe._REGISTRY))
    monkeypatch.setattr(recipe, "entry_points", lambda group: [FakeEntryPoint()])
    assert {"aion", "hyper", "adyt", "count-residuals"} <= set(registered())
    case = next(c for c in ZOO if c.name == "nanogpt")
    with pytest.warns(surgeon.NoEffectWarning, match="found no modules it rewrites in NanoGPT"):
        surgeon.apply(case.build(), ["count-residuals"], case.example())
    assert CountResiduals.seen == [4]
