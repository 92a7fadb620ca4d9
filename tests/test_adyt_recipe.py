"""DyT's recipe in the `adyt` pass (passes/dyt_recipe.py): per-role α0 in a token model, gains
matched to the untrained norms' output scale (kept through α(t)'s first move), DyT's optional
scale on the trunk input; chosen automatically for untrained models and recorded so a reload
replays the same rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from torch import nn

import surgeon
from surgeon.applying import applied_passes
from surgeon.nn import ADyT, InputScale

TOKEN_MODELS = {  # zoo factory → the first block's name
    "llama": (zoo.hf_llama, "model.layers.0"),
    "gpt2": (zoo.hf_gpt2, "transformer.h.0"),
}


def example() -> dict:
    return {"input_ids": zoo.tokens(vocab=128, seq=16)}


def scales(model: nn.Module) -> dict[str, float]:
    return {n: float(m.scale) for n, m in model.named_modules() if isinstance(m, InputScale)}


def alphas(model: nn.Module) -> dict[str, float]:
    return {n: round(float(m.alpha0), 4) for n, m in model.named_modules() if isinstance(m, ADyT)}


def first_block_input_rms(model: nn.Module, block: str, ex: dict) -> float:
    seen = []
    hook = model.get_submodule(block).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    with torch.no_grad():
        model(**ex)
    hook.remove()
    return float(seen[0].pow(2).mean().sqrt())


def adyt_output_rms(model: nn.Module, ex: dict) -> dict[str, float]:
    """Each ADyT's output rms on `ex`, at its first call."""
    seen: dict[str, float] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, float(out.float().pow(2).mean().sqrt()))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, ADyT)]
    with torch.no_grad():
        model(**ex)
    for h in hooks:
        h.remove()
    return seen


def gains_at_init(model: nn.Module) -> bool:
    return all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, ADyT))


@pytest.mark.parametrize("name", sorted(TOKEN_MODELS))
@pytest.mark.parametrize("passes", [["adyt"], ["aion", "hyper", "adyt"]])
def test_untrained_token_model_gets_the_recipe(name: str, passes: list[str]) -> None:
    build, block = TOKEN_MODELS[name]
    torch.manual_seed(0)
    model, ex = build().eval(), example()
    rms = first_block_input_rms(model, block, ex)
    assert rms < 0.1  # HF's std-0.02 embedding: tanh(α·x) alone would give ≈ α·rms, not 1
    surgeon.apply(model, passes, ex)
    assert applied_passes(model)[-1]["_data"]["recipe"] == "dyt"  # recorded, not "auto"
    assert scales(model) == {}  # DyT's trunk scale is opt-in (input_scale=rms|sqrt_d)
    out = adyt_output_rms(model, ex)
    assert len(out) == len(alphas(model)) == 5  # 2 blocks of 2 norms, the final norm
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in out.values()), out
    assert all(m.keep_scale_at_first_update for m in model.modules() if isinstance(m, ADyT))
    got = alphas(model)
    final = [n for n in got if not n.startswith(block.rsplit(".", 1)[0])]
    first_norms = [n for n in got if n.startswith(block + ".")]
    assert len(final) == 1 and got[final[0]] == 0.2  # DyT's final-norm α0
    assert sorted(got[n] for n in first_norms) == [0.2, 0.8]  # attention 0.8, ffn 0.2


@pytest.mark.parametrize("spec", ["adyt", "adyt:input_scale=rms"])
def test_the_recipe_trains_and_the_model_learns(spec: str) -> None:
    torch.manual_seed(0)
    model, ex = zoo.hf_llama(), example()
    surgeon.apply(model, [spec], ex)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    surgeon.attach(model, opt)
    ids = ex["input_ids"]
    trainable = [m.scale for m in model.modules() if isinstance(m, InputScale)]
    start, losses = [t.detach().clone() for t in trainable], []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    assert len(trainable) == (spec != "adyt")
    assert all(not torch.equal(t.detach(), s) for t, s in zip(trainable, start))


@pytest.mark.parametrize("updates", [
    [(0.01, False)],                 # α(t) moves from α0·1.1 to the cap: the gain follows
    [(0.01, True), (0.01, False)],   # a skipped step (AMP overflow) does not count as the first
    [(0.01, False), (1.0, False)],   # only the first update rescales
])
def test_gain_keeps_the_scale_at_alphas_first_move(updates: list) -> None:
    m = ADyT(8, alpha0=0.2)
    m.keep_scale_at_first_update = True
    start, first = float(m.alpha()), None
    for g, skip in updates:
        m.update_grad_norm_(torch.tensor(g), torch.tensor(skip))
        if not skip and first is None:
            first = float(m.alpha())
    assert start == pytest.approx(0.22) and first == pytest.approx(2.0)  # the clamp's cap
    assert torch.allclose(m.weight, torch.full((8,), start / first))
    plain = ADyT(8, alpha0=0.2)  # without the recipe the gain is the optimizer's alone
    plain.update_grad_norm_(torch.tensor(0.01))
    assert torch.equal(plain.weight, torch.ones(8))


def test_trained_model_keeps_plain_alpha0_and_no_scale() -> None:
    torch.manual_seed(0)
    model, ex = zoo.hf_llama().eval(), example()
    with torch.no_grad():  # gains that training moved
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.mul_(1 + 0.1 * torch.randn_like(m.weight))
    surgeon.apply(model, ["adyt"], ex)
    assert applied_passes(model)[-1]["_data"]["recipe"] == "none"
    assert scales(model) == {}
    assert set(alphas(model).values()) == {0.5}


@pytest.mark.parametrize("spec, matched", [("adyt:recipe=none", False),
                                           ("adyt:recipe=dyt", True),
                                           ("adyt:calibrate=true", False)])
def test_explicit_recipe_wins(spec: str, matched: bool) -> None:
    """An explicit recipe is applied as asked; calibrating (keeping the function) means none."""
    torch.manual_seed(0)
    model = zoo.hf_gpt2().eval()
    surgeon.apply(model, [spec], example())
    assert applied_passes(model)[-1]["_data"]["recipe"] == ("dyt" if matched else "none")
    assert gains_at_init(model) is not matched or spec.endswith("calibrate=true")
    assert scales(model) == {}


@pytest.mark.parametrize("name", sorted(TOKEN_MODELS))
def test_trunk_scale_starts_at_one_over_rms(name: str) -> None:
    build, block = TOKEN_MODELS[name]
    torch.manual_seed(0)
    model, ex = build().eval(), example()
    rms = first_block_input_rms(model, block, ex)
    surgeon.apply(model, ["adyt:input_scale=rms"], ex)
    assert scales(model) == {f"{block}.input_scale": pytest.approx(1 / rms, rel=1e-5)}
    assert first_block_input_rms(model, block, ex) == pytest.approx(rms, rel=1e-6)  # before it
    out = adyt_output_rms(model, ex)  # gains matched behind the scale too
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in out.values()), out


def test_sqrt_d_start() -> None:
    torch.manual_seed(0)
    model = zoo.hf_llama().eval()
    surgeon.apply(model, ["adyt:recipe=dyt,input_scale=sqrt_d"], example())
    assert list(scales(model).values()) == [pytest.approx(32 ** 0.5)]


def test_model_without_token_embedding_gets_no_scale() -> None:
    torch.manual_seed(0)
    case = {c.name: c for c in zoo.ZOO}["swin_ish"]  # a hierarchical vision transformer
    model = case.build().eval()
    surgeon.apply(model, ["adyt:recipe=dyt,input_scale=rms"], case.example())
    assert scales(model) == {}
    assert set(alphas(model).values()) == {0.5}  # DyT's default outside language models
    assert not gains_at_init(model)  # matched all the same


@pytest.mark.parametrize("spec", ["adyt", "adyt:input_scale=rms"])
def test_reload_replays_the_recipe(spec: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, ex = zoo.hf_llama().eval(), example()
    surgeon.apply(model, ["aion", spec], ex)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InputScale):
                m.scale.fill_(3.0)  # as if trained
            if isinstance(m, ADyT):
                m.weight.mul_(1.5)  # trained gains: a replay must not pick recipe=none
    loaded = surgeon.load(surgeon.save(model, tmp_path / "converted"))
    assert scales(loaded) == scales(model)
    assert [m.keep_scale_at_first_update for m in loaded.modules() if isinstance(m, ADyT)] == [
        m.keep_scale_at_first_update for m in model.modules() if isinstance(m, ADyT)]
    with torch.no_grad():
        assert torch.equal(loaded(**ex).logits, model(**ex).logits)


@pytest.mark.parametrize("trained", [False, True])
def test_convert_decides_from_the_weights_on_disk(trained: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.hf_llama()
    if trained:
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__.endswith("RMSNorm"):
                    m.weight.mul_(1.25)
    model.save_pretrained(tmp_path / "src")
    result = surgeon.convert(str(tmp_path / "src"), tmp_path / "dst", ["adyt"])
    loaded = surgeon.load(result.path if hasattr(result, "path") else tmp_path / "dst")
    assert applied_passes(loaded)[-1]["_data"]["recipe"] == ("none" if trained else "dyt")
    keep = {m.keep_scale_at_first_update for m in loaded.modules() if isinstance(m, ADyT)}
    assert keep == {not trained}
