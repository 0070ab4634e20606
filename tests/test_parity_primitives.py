"""Reference parity of the primitives: fake quantizers, LSQ, log2 / AGQ, observers, AdaRound, BIG, PCC.

Each test feeds a fixture's inputs to the ptqbench function its manifest entry names, in the call
sequence of `tests/parity/README.md`, and requires every expected output within the fixture's
tolerance (`parity_fixtures.compare`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqbench.methods.ptq4sam.agq import AgqSearch
from ptqbench.methods.ptq4sam.big import channel_signs, is_bimodal
from ptqbench.methods.saqsam.pcc import focus_distance
from ptqbench.quant import functional as qf
from ptqbench.quant.adaround import AdaRoundQuantizer, beta_schedule
from ptqbench.quant.observers import make_observer
from ptqbench.quant.quantizer import FakeQuantizer

from parity_fixtures import compare, fixtures_of, load


def _ids(fixtures: list[dict]) -> list[str]:
    return [f["name"] for f in fixtures]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array)).float()


def _check(fixture: dict, got: dict, expected: dict, data_range: float | None = None) -> None:
    problems = compare(fixture, {k: np.asarray(v) for k, v in got.items()}, expected, data_range)
    assert not problems, f"{fixture['name']} ({fixture['ptqbench']}):\n" + "\n".join(problems)


def _forward_backward(quantizer_or_fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = quantizer_or_fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


FQ_TENSOR = fixtures_of("fq_per_tensor")


@pytest.mark.parametrize("device", DEVICES)  # on a GPU the quantizer's training forward is fused (fused_lsq)
@pytest.mark.parametrize("fixture", FQ_TENSOR, ids=_ids(FQ_TENSOR))
def test_fake_quant_per_tensor(fixture: dict, device: str) -> None:
    inputs, expected = load(fixture)
    bits = fixture["params"]["bits"]
    x, upstream = _t(inputs["x"]), _t(inputs["upstream_grad"])
    scale, zero_point = qf.affine_qparams(*(torch.tensor(v) for v in fixture["params"]["range"]), bits)
    quantizer = FakeQuantizer(bits, is_weight=False).to(device)
    quantizer.set_range(*(torch.tensor(v) for v in fixture["params"]["range"]))
    y, grad_x = (t.cpu() for t in _forward_backward(quantizer, x.to(device), upstream.to(device)))
    y_plain = qf.fake_quant_affine(x, scale, zero_point, bits)
    _check(fixture, {"scale": scale, "zero_point": zero_point, "y": y, "grad_x": grad_x}, expected)
    _check(fixture, {"scale": scale, "zero_point": zero_point, "y": y_plain, "grad_x": grad_x}, expected)


LSQ = fixtures_of("lsq_per_tensor", "lsq_per_channel")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fixture", LSQ, ids=_ids(LSQ))
def test_lsq(fixture: dict, device: str) -> None:
    inputs, expected = load(fixture)
    channel_axis = fixture["params"].get("ch_axis")
    quantizer = FakeQuantizer(fixture["params"]["bits"], is_weight=channel_axis is not None,
                              channel_axis=channel_axis).to(device)
    scale, zero_point = _t(expected["scale"]), _t(expected["zero_point"])
    if channel_axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    quantizer._store(scale, zero_point)
    quantizer.mode = "quantize"
    learnable = quantizer.make_scale_learnable()
    y, grad_x = (t.cpu() for t in _forward_backward(quantizer, _t(inputs["x"]).to(device),
                                                     _t(inputs["upstream_grad"]).to(device)))
    _check(fixture, {"scale": expected["scale"], "zero_point": expected["zero_point"], "y": y, "grad_x": grad_x,
                     "grad_scale": learnable.grad.cpu()}, expected)


FQ_CHANNEL = fixtures_of("fq_per_channel")


@pytest.mark.parametrize("fixture", FQ_CHANNEL, ids=_ids(FQ_CHANNEL))
def test_fake_quant_per_channel(fixture: dict) -> None:
    inputs, expected = load(fixture)
    x = _t(inputs["x"])
    shape = [-1] + [1] * (x.dim() - 1)
    scale, zero_point = _t(expected["scale"]), _t(expected["zero_point"])
    y, grad_x = _forward_backward(
        lambda v: qf.fake_quant_affine(v, scale.reshape(shape), zero_point.reshape(shape), fixture["params"]["bits"]),
        x, _t(inputs["upstream_grad"]))
    _check(fixture, {"scale": scale, "zero_point": zero_point, "y": y, "grad_x": grad_x}, expected)


LOG2 = fixtures_of("log2_value")


@pytest.mark.parametrize("fixture", LOG2, ids=_ids(LOG2))
def test_log2_value(fixture: dict) -> None:
    inputs, expected = load(fixture)
    params = fixture["params"]
    y = qf.fake_quant_log2(_t(inputs["x"]), _t(expected["scale"]), params["tau"], params["bits"])
    _check(fixture, {"scale": expected["scale"], "y": y}, expected)


AGQ_GRAD = fixtures_of("agq_grad")


@pytest.mark.parametrize("fixture", AGQ_GRAD, ids=_ids(AGQ_GRAD))
def test_agq_scale_gradient(fixture: dict) -> None:
    inputs, expected = load(fixture)
    params = fixture["params"]
    quantizer = FakeQuantizer(params["bits"], is_weight=False)
    quantizer.set_log2(params["tau"], _t(expected["scale"]))
    scale = quantizer.make_scale_learnable()
    y, grad_x = _forward_backward(quantizer, _t(inputs["x"]), _t(inputs["upstream_grad"]))
    _check(fixture, {"scale": expected["scale"], "y": y, "grad_x": grad_x, "grad_scale": scale.grad}, expected)


def _observe(fixture: dict, inputs: dict, name: str, device: str = "cpu", **options) -> dict:
    bits = fixture["params"]["bits"]
    observer = make_observer(name, bits=bits, **options)
    for key in fixture["inputs"]:
        observer.update(_t(inputs[key]).to(device))
    x_min, x_max = (v.cpu() for v in observer.compute_range(bits))
    scale, zero_point = qf.affine_qparams(x_min, x_max, bits)
    return {"min_val": x_min, "max_val": x_max, "scale": scale, "zero_point": zero_point}


def _data_range(inputs: dict) -> float:
    values = [np.asarray(v) for v in inputs.values()]
    return float(max(v.max() for v in values) - min(v.min() for v in values))


STATISTICS = fixtures_of("observer_minmax", "observer_avgminmax")


@pytest.mark.parametrize("fixture", STATISTICS, ids=_ids(STATISTICS))
def test_minmax_observers(fixture: dict) -> None:
    inputs, expected = load(fixture)
    name = "minmax" if fixture["kind"] == "observer_minmax" else "avgminmax"
    channel_axis = fixture["params"].get("ch_axis")
    bits = fixture["params"]["bits"]
    observer = make_observer(name, channel_axis=channel_axis, bits=bits)
    for key in fixture["inputs"]:
        observer.update(_t(inputs[key]))
    x_min, x_max = observer.compute_range(bits)
    scale, zero_point = qf.affine_qparams(x_min, x_max, bits)
    _check(fixture, {"min_val": x_min, "max_val": x_max, "scale": scale, "zero_point": zero_point}, expected)


MSE_WEIGHT = fixtures_of("observer_mse_weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fixture", MSE_WEIGHT, ids=_ids(MSE_WEIGHT))
def test_mse_weight_observer(fixture: dict, device: str) -> None:
    inputs, expected = load(fixture)
    bits = fixture["params"]["bits"]
    observer = make_observer("mse", channel_axis=0, bits=bits)
    observer.update(_t(inputs["call0"]).to(device))
    x_min, x_max = (v.cpu() for v in observer.compute_range(bits))
    scale, zero_point = qf.affine_qparams(x_min, x_max, bits)
    _check(fixture, {"min_val": x_min, "max_val": x_max, "scale": scale, "zero_point": zero_point}, expected)


AVG_MSE_FAST = fixtures_of("observer_avgmsefast", "observer_signavgmsefast")


# On a GPU the fused loss (`ptqbench.quant.fused_lp_error`) sums in another order and rounds pow
# differently in the last bits; on this fixture's flat loss one call's search then stops near
# another minimum, outside the fixture's tolerance (strict: the mark fails once it matches).
GPU_SEARCH_DEVIATES = {"obs_avgmsefast_post_gelu_b6"}
AVG_MSE_FAST_CASES = [
    pytest.param(fixture, device, id=f"{fixture['name']}-{device}",
                 marks=[pytest.mark.xfail(strict=True, reason="fused float32 loss, flat landscape")]
                 if device == "cuda" and fixture["name"] in GPU_SEARCH_DEVIATES else [])
    for fixture in AVG_MSE_FAST for device in DEVICES]


@pytest.mark.parametrize(("fixture", "device"), AVG_MSE_FAST_CASES)
def test_averaged_mse_search(fixture: dict, device: str) -> None:
    """The reference's averaged MSEFast ranges, on the CPU and (fused losses) on a GPU."""
    inputs, expected = load(fixture)
    _check(fixture, _observe(fixture, inputs, "mse", device), expected, _data_range(inputs))


AGQ_SEARCH = fixtures_of("observer_logavgmsefast")


@pytest.mark.parametrize("fixture", AGQ_SEARCH, ids=_ids(AGQ_SEARCH))
def test_agq_search(fixture: dict) -> None:
    inputs, expected = load(fixture)
    search = AgqSearch(fixture["params"]["bits"])
    for index in range(fixture["params"]["calls"]):
        search.update(_t(inputs[f"attn{index}"]), _t(inputs[f"value{index}"]))
    result = search.result()
    got = {"best_tau_scales": [result.scales[t] for t in search.taus],
           "tau_errors": [result.errors[t] for t in search.taus], "tau": result.tau, "scale": result.scale}
    _check(fixture, got, expected)


ADAROUND = fixtures_of("adaround")


@pytest.mark.parametrize("fixture", ADAROUND, ids=_ids(ADAROUND))
def test_adaround(fixture: dict) -> None:
    inputs, expected = load(fixture)
    params = fixture["params"]
    weight = _t(inputs["weight"])
    base = FakeQuantizer(params["bits"], is_weight=True, channel_axis=0)
    base._store(_t(inputs["scale"]), _t(inputs["zero_point"]))
    base.mode = "quantize"
    rounding = AdaRoundQuantizer(weight, base)
    got = {"v_init": rounding.v.detach().clone(), "soft_init": rounding(weight).detach()}
    with torch.no_grad():
        rounding.v.copy_(_t(inputs["v_moved"]))
    from ptqbench.quant.adaround import rectified_sigmoid

    got["h_moved"] = rectified_sigmoid(rounding.v).detach()
    got["soft_moved"] = rounding(weight).detach()
    got["hard_moved"] = rounding.hard_weight()
    steps = [int(s) for s in np.asarray(inputs["steps"]).reshape(-1)]
    start, end = params["b_range"]
    betas = [beta_schedule(s, params["iters"], params["warm_up"], start, end) for s in steps]
    got["beta"] = [start if b is None else b for b in betas]
    got["round_loss"] = [0.0 if b is None else params["reg_weight"] * float(rounding.regularizer(b)) for b in betas]
    _check(fixture, got, expected)


BIG = fixtures_of("big_detect")


@pytest.mark.parametrize("fixture", BIG, ids=_ids(BIG))
def test_big_detection(fixture: dict) -> None:
    inputs, expected = load(fixture)
    keys = _t(inputs["keys"])
    bimodal = is_bimodal(keys[0])
    sign = channel_signs(keys) if bimodal else torch.zeros(keys.shape[-1])
    got = {"is_bimodal": np.array(int(bimodal)), "sign": sign.numpy().astype(expected["sign"].dtype)}
    _check(fixture, got, expected)


AOL = fixtures_of("pcc_aol")


@pytest.mark.parametrize("fixture", AOL, ids=_ids(AOL))
def test_focus_distance(fixture: dict) -> None:
    inputs, expected = load(fixture)
    loss = focus_distance(_t(inputs["attn_fp"]), _t(inputs["attn_q"]), fixture["params"]["theta"])
    _check(fixture, {"loss": loss}, expected)
