"""surgeon.apply over the zoo: every (model × pass combination) row rewrites what it should,
preserves the function where promised, trains every new parameter, keeps every original key
and the model's class, and changes nothing when applied again."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, ZooCase

from surgeon.applying import _plain, apply
from surgeon.nn import ADyT, AionResidual
from surgeon.recipe import PassError, parse_pass
from surgeon.tracing import flatten, run_example

COMBOS = [("aion",), ("adyt",), ("aion", "adyt"), ("adyt", "aion")]


def output_sum(model: torch.nn.Module, example: tuple | dict) -> torch.Tensor:
    """A fixed random projection of every float output (a norm's output has a constant mean
    square, so that would be a loss without gradient)."""
    out = flatten(_plain(run_example(model, example)))[0]
    gen = torch.Generator().manual_seed(0)
    return sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in out
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def expected_new(case: ZooCase, name: str) -> int:
    if name == "aion":
        return sum(case.residuals.values())
    return sum(case.norms.values())


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_apply_row(case: ZooCase, combo: tuple[str, ...]) -> None:
    model, example = case.build(), case.example()
    cls, keys = type(model), set(model.state_dict())
    apply(model, list(combo), example)

    assert type(model) is cls
    assert keys <= set(model.state_dict()), keys - set(model.state_dict())
    by_pass = {d.pass_name: d for d in model.surgeon_drift}
    for name in combo:
        assert by_pass[name].modules == expected_new(case, name)
    assert sum(isinstance(m, AionResidual) for m in model.modules()) == (
        expected_new(case, "aion") if "aion" in combo else 0)
    assert sum(isinstance(m, ADyT) for m in model.modules()) == (
        expected_new(case, "adyt") if "adyt" in combo else 0)
    if combo[0] == "aion":  # the preserving start: exact in fp32
        assert by_pass["aion"].max_abs == 0.0 and by_pass["aion"].cosine == pytest.approx(1.0)

    # One optimizer step moves every new parameter.
    new_params = {n: p.detach().clone() for n, p in model.named_parameters()
                  if n not in keys or any(isinstance(m, (AionResidual, ADyT)) and n.startswith(mn)
                                          for mn, m in model.named_modules() if mn)}
    new_params = {n: v for n, v in new_params.items()
                  if dict(model.named_parameters())[n].requires_grad}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-30)  # ~lr for any gradient
    output_sum(model, example).backward()
    opt.step()
    params = dict(model.named_parameters())
    unmoved = [n for n, v in new_params.items() if torch.equal(params[n].detach(), v)]
    assert not unmoved, {n: params[n].grad for n in unmoved}

    # Idempotent: the same passes again change nothing.
    model.eval()
    with torch.no_grad():
        before = output_sum(model, example)
    modules = [n for n, _ in model.named_modules()]
    apply(model, list(combo), example)
    assert [n for n, _ in model.named_modules()] == modules
    with torch.no_grad():
        assert torch.equal(output_sum(model, example), before)


def test_pass_specs_and_errors() -> None:
    config = parse_pass("aion:preset=rezero,preserve=false,include=transformer.h.0*")
    assert config.preset == "rezero" and config.include == ("transformer.h.0*",)
    assert parse_pass(config.to_json()["_type"]).to_json() != config.to_json()
    with pytest.raises(PassError, match="unknown pass 'hyperr'"):
        parse_pass("hyperr")
    with pytest.raises(PassError, match="unknown option 'gamma'"):
        parse_pass("aion:gamma=1")
    with pytest.raises(PassError, match="expected true or false"):
        parse_pass("aion:preserve=maybe")
    with pytest.raises(PassError, match="cannot preserve"):
        parse_pass("aion:preset=rezero")


def test_filter_limits_the_rewrite() -> None:
    case = next(c for c in ZOO if c.name == "hf_gpt2")
    model = case.build()
    apply(model, ["aion:include=transformer.h.1"], case.example())
    owners = {n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, AionResidual)}
    assert owners == {"transformer.h.1"}
