"""CompactAdamW: exact AdamW for the blocks, 8-bit or factored moments for the always-active set."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from lightning_lisa import LISA, CompactAdamW, compact_adamw, optimizer_state_bytes
from lightning_lisa.compact import (
    _dequantize_root,
    _dequantize_signed,
    _quantize_root,
    _quantize_signed,
    compact_state_nbytes,
    compact_step_nbytes,
)
from lightning_lisa.errors import LISAConfigError
from lightning_lisa.testing import CausalLM, quiet_trainer, tiny_llama, token_loader


def feed(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_quantization_round_trips_within_a_few_percent_of_the_block_maximum():
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    codes, absmax = _quantize_signed(x, 64)
    assert codes.dtype == torch.int8 and codes.numel() == 1024 and absmax.numel() == 16
    back = _dequantize_signed(codes, absmax, 64)[:1000]
    blockmax = absmax.repeat_interleave(64)[:1000]
    assert ((back - x).abs() / blockmax).max() < 0.02
    assert torch.equal(back.sign()[back != 0], x.sign()[back != 0])
    s = x.abs()
    codes, absmax = _quantize_root(s, 64)
    assert codes.dtype == torch.uint8
    back = _dequantize_root(codes, absmax, 64)[:1000]
    assert ((back - s).abs() / blockmax).max() < 0.01
    assert (back > 0).all()  # no second moment becomes 0: no division by eps alone


@pytest.mark.parametrize("mode", ["8bit", "factored"])
@pytest.mark.parametrize("kwargs", [{}, {"foreach": True}, {"fused": True}])
def test_exact_groups_are_torch_adamw_bit_for_bit(mode, kwargs):
    torch.manual_seed(0)
    blocks = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(3)]
    embed = torch.nn.Parameter(torch.randn(64, 8))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in blocks]
    ours = CompactAdamW([{"params": blocks}, {"params": [embed], "compact": mode}], lr=0.1, weight_decay=0.1, **kwargs)
    torch_adamw = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1, **kwargs)
    for step in range(4):
        feed([*blocks, embed], step)
        feed(reference, step)
        ours.step()
        torch_adamw.step()
    for p, q in zip(blocks, reference, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg_sq"], torch_adamw.state[q]["exp_avg_sq"])


@pytest.mark.parametrize(("mode", "bytes_per_param", "tolerance"), [("8bit", 2.04, 0.25), ("factored", 1.2, 0.5)])
def test_compact_moments_follow_adamw_in_less_memory(mode, bytes_per_param, tolerance):
    torch.manual_seed(0)
    start = torch.randn(256, 64)
    exact = torch.nn.Parameter(start.clone())
    compact = torch.nn.Parameter(start.clone())
    a = torch.optim.AdamW([exact], lr=1e-2)
    b = CompactAdamW([compact], lr=1e-2, compact=mode)
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        grad = torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g)  # rows of different scales
        exact.grad, compact.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    moved = (exact - start).abs().mean()
    # close to AdamW's trajectory (the factored second moment is an estimate of a different shape)
    assert (compact - exact).abs().mean() < tolerance * moved
    assert optimizer_state_bytes([b]) < bytes_per_param * compact.numel() < optimizer_state_bytes([a]) / 3


def test_rows_without_gradient_do_not_move():
    embed = torch.nn.Embedding(50, 8)
    before = embed.weight.detach().clone()
    optimizer = compact_adamw(torch.nn.ModuleDict({"embed": embed}), always_active=["embed"], weight_decay=0.0)
    for _ in range(3):
        embed(torch.tensor([1, 2, 3])).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(embed.weight[10:], before[10:])
    assert not torch.equal(embed.weight[1:4], before[1:4])


@pytest.mark.parametrize("mode", ["8bit", "factored"])
def test_state_dict_round_trip_continues_identically(mode):
    def build() -> tuple[list[torch.nn.Parameter], CompactAdamW]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(16))]
        return params, CompactAdamW([{"params": params[:1], "compact": mode}, {"params": params[1:]}], lr=1e-2)

    params, optimizer = build()
    for step in range(3):
        feed(params, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"weights": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    loaded_params, loaded = build()
    with torch.no_grad():
        for p, w in zip(loaded_params, saved["weights"], strict=True):
            p.copy_(w)
    loaded.load_state_dict(saved["optimizer"])
    assert loaded.state[loaded_params[0]]["exp_avg_codes"].dtype == torch.int8
    assert loaded.state[loaded_params[0]]["exp_avg_absmax"].dtype == torch.float32  # not cast to bf16
    for step in range(3, 5):
        feed(params, step)
        feed(loaded_params, step)
        optimizer.step()
        loaded.step()
    for p, q in zip(params, loaded_params, strict=True):
        assert torch.equal(p, q)


def test_compact_adamw_puts_the_default_always_active_set_in_the_compact_group():
    model = CausalLM(tiny_llama(2))
    optimizer = compact_adamw(model, lr=1e-3, compact="factored")
    exact, compact = optimizer.param_groups
    assert (exact["compact"], compact["compact"]) == (None, "factored")
    assert {id(p) for p in compact["params"]} == {
        id(model.model.model.embed_tokens.weight),
        id(model.model.lm_head.weight),
    }
    assert len(exact["params"]) + len(compact["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: compact_adamw(m, compact="4bit"), "`compact='4bit'` is not one of"),
        (lambda m: compact_adamw(m, block_size=100), "`block_size=100` is not allowed"),
        (lambda m: compact_adamw(m, amsgrad=True), "`amsgrad=True` is not supported"),
        (lambda m: compact_adamw(m, always_active=["nope"]), "nope"),
        (lambda m: compact_adamw(m, compact_blocks="exact"), "`compact_blocks='exact'` is not one of"),
        (lambda m: compact_adamw(m, compact=None), "nothing would be compact"),
        (lambda m: compact_adamw(m, always_active=[]), "holds no parameters and `compact_blocks=None`"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(LISAConfigError, match=message):
        call(CausalLM(tiny_llama(2)))


def test_compact_blocks_gives_every_parameter_compact_moments():
    model = CausalLM(tiny_llama(2))
    optimizer = compact_adamw(model, compact="factored", compact_blocks="factored", weight_decay=0.0)
    assert [g["compact"] for g in optimizer.param_groups] == ["factored", "factored"]
    exact = compact_adamw(model, compact="factored")
    for opt in (optimizer, exact):
        model.zero_grad()
        model.model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
        opt.step()
    assert not any("exp_avg" in s for s in optimizer.state.values())  # no float moments left
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert all({"exp_avg_sq_row", "exp_avg_sq_col"} <= optimizer.state[p].keys() for p in matrices)
    # counted from the tensors: less than a third of the state with exact blocks
    assert optimizer_state_bytes([optimizer]) < optimizer_state_bytes([exact]) / 3


def test_an_empty_always_active_set_or_exact_always_active_moments_with_compact_blocks():
    model = CausalLM(tiny_llama(2))
    everything = compact_adamw(model, always_active=[], compact_blocks="8bit")
    assert [g["compact"] for g in everything.param_groups] == ["8bit"]
    assert len(everything.param_groups[0]["params"]) == len(list(model.parameters()))
    exact_always = compact_adamw(model, compact=None, compact_blocks="factored")
    assert [g["compact"] for g in exact_always.param_groups] == ["factored", None]
    model.model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    exact_always.step()
    head = model.model.lm_head.weight
    assert sorted(exact_always.state[head]) == ["exp_avg", "exp_avg_sq", "step"]  # exact moments
    block = model.model.model.layers[0].mlp.up_proj.weight
    assert "exp_avg_sq_row" in exact_always.state[block]


class CompactLM(CausalLM):
    def configure_optimizers(self) -> Any:
        kwargs = self.hparams["optimizer_kwargs"] or {}
        return compact_adamw(self, lr=1e-2, compact=self.hparams["optimizer"], **kwargs)


@pytest.mark.parametrize(("mode", "compact_blocks"), [("drop", None), ("offload", None), ("drop", "factored")])
def test_lisa_frees_the_blocks_state_and_keeps_the_compact_state(mode, compact_blocks):
    lisa = LISA(n_layers=1, interval=2, optimizer_state=mode)
    module = CompactLM(tiny_llama(4), optimizer="8bit", optimizer_kwargs={"compact_blocks": compact_blocks})
    quiet_trainer([lisa], max_steps=5).fit(module, token_loader(8))
    optimizer = module.trainer.optimizers[0]
    embed = module.model.model.embed_tokens.weight
    assert optimizer.state[embed]["exp_avg_codes"].dtype == torch.int8
    assert module.model.lm_head.weight in optimizer.state
    active = {id(p) for i in lisa.active_layers for p in module.model.model.layers[i].parameters()}
    key = "exp_avg" if compact_blocks is None else "exp_avg_codes"
    always = {id(embed), id(module.model.lm_head.weight)}
    with_block_state = {id(p) for p, s in optimizer.state.items() if key in s} - always
    if mode == "drop":  # of the blocks, only the active one keeps state
        assert with_block_state == active
    else:  # the state of the blocks trained earlier is kept (offloaded)
        assert active < with_block_state
    if compact_blocks is not None:
        assert all(optimizer.state[p]["exp_avg_codes"].dtype == torch.int8 for p in optimizer.state)


@pytest.mark.parametrize(("mode", "compact_blocks"), [("8bit", None), ("factored", None), ("factored", "factored")])
def test_with_the_step_in_backward_the_weights_equal_a_normal_run(mode, compact_blocks):
    def run(step_in_backward: bool) -> CompactLM:
        module = CompactLM(tiny_llama(4), optimizer=mode, optimizer_kwargs={"compact_blocks": compact_blocks})
        quiet_trainer([LISA(n_layers=1, interval=2, step_in_backward=step_in_backward)], max_steps=6).fit(
            module, token_loader(8)
        )
        return module

    normal, in_backward = run(False), run(True)
    for (name, a), b in zip(normal.named_parameters(), in_backward.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["8bit", "factored"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2000, 2048), torch.bfloat16),
        ((4096, 1024), torch.float32),  # exactly one chunk (CHUNK elements)
        ((512,), torch.bfloat16),
        ((3000, 2048), torch.bfloat16),  # two chunks (8-bit: CHUNK elements, factored: 2048 rows)
        ((5000, 1000), torch.float32),  # two chunks; factored: 4192 rows, a multiple of 32 (1000 * 32 = 125 blocks)
        ((300, 1001), torch.bfloat16),  # 300300 elements: the last block is padded
    ],
)
def test_state_and_step_bytes_equal_the_counted_tensors(mode, shape, dtype):
    from lightning_lisa.estimate.measure import TensorPeak

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    p.grad = torch.randn(shape, dtype=dtype)
    optimizer = CompactAdamW([p], compact=mode)
    optimizer.step()
    state = list(optimizer.state[p].values())
    assert sum(t.untyped_storage().nbytes() for t in state) == compact_state_nbytes(shape, mode)
    existing = [p, p.grad, *state]
    with TensorPeak() as peak:
        peak.track(existing)
        before = peak.current
        del existing, state
        optimizer.step()
    assert peak.peak - before == pytest.approx(compact_step_nbytes(shape, mode, p.element_size()), rel=1e-3)


def _scaled_run(fused: bool, scaler: torch.amp.GradScaler | None, grads: list[float]) -> tuple[Any, ...]:
    """Two parameters (an exact and a compact group) stepped once per gradient factor, under ``scaler``."""
    torch.manual_seed(0)
    exact, compact = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(64, 32))
    groups = [{"params": [exact]}, {"params": [compact], "compact": "factored", "block_size": 16}]
    optimizer = CompactAdamW(groups, lr=1e-2, eps=0.1, fused=fused)  # a large eps: the update depends on the scale
    for factor in grads:
        loss = (exact**2).sum() + factor * (compact**3).sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    return exact.detach().clone(), compact.detach().clone(), optimizer


def test_fused_compact_groups_honour_the_grad_scaler():
    # the fused exact groups leave the unscaling to the optimizer: the compact groups must unscale too
    plain_exact, plain_compact, _ = _scaled_run(True, None, [1.0, 0.5])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    exact, compact, optimizer = _scaled_run(True, scaler, [1.0, 0.5])
    assert optimizer._step_supports_amp_scaling  # the GradScaler passed the scale to the optimizer
    torch.testing.assert_close(exact, plain_exact)
    torch.testing.assert_close(compact, plain_compact)
    # an overflowing step (inf in the compact parameter's gradient) is skipped in every group
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    exact_inf, compact_inf, optimizer = _scaled_run(True, scaler, [1.0, 0.5, float("inf")])
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow
    torch.testing.assert_close(exact_inf, exact, rtol=0, atol=0)
    torch.testing.assert_close(compact_inf, compact, rtol=0, atol=0)
    assert all(float(s["step"]) == 2 for s in optimizer.state.values())
