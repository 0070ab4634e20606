"""Reference parity at the model level: PCC on one attention and the whole `saqsam-s` calibration of
the shipped sam_tiny, against numbers the SAQ-SAM reference code produced (`tests/parity/`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling.transformer import Attention

from ptqbench.config import BitSpec
from ptqbench.methods.saqsam.method import SaqSamS
from ptqbench.methods.saqsam.pcc import PccConfig, search_attention
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.checkpoints import load_model
from ptqbench.models.sam1.quantized import QuantDecoderAttention, quantize_sam
from ptqbench.quant.sites import quantizer_sites

from parity_fixtures import PARITY, compare, fixtures_of, load

PCC_SEARCH = fixtures_of("pcc_attention_search")
MODEL = fixtures_of("model_calibration")
CHAOS_BUDGET = {"model_weights_mse": 0, "model_big": 0, "model_pcc_ranges": 4, "model_activation_ranges": 6,
                "model_agq": 1}
"""Keys of a model fixture that may differ from the reference, at most. The second PCC pass and the
averaged bounded searches sit on near-ties (focus distances 0.2159 vs 0.2166; local minima of a
piecewise objective): a 1e-7 relative change of the prompt encoder's PE matrix already flips the
second-pass picks of two attentions, and the same code on another CPU and torch (the GPU machine's)
moves another activation range. An algorithmic difference moves many keys at once (before the
reference flow was followed: 53 of 112 PCC keys, 202 of 276 activation keys, 8 of 26 AGQ keys)."""


@pytest.mark.parametrize("fixture", PCC_SEARCH, ids=[f["name"] for f in PCC_SEARCH])
def test_pcc_attention_search(fixture: dict) -> None:
    inputs, expected = load(fixture)
    params = fixture["params"]
    attention = Attention(params["embedding_dim"], params["num_heads"], params["downsample_rate"])
    state = {key[2:].replace("_proj_", "_proj."): torch.from_numpy(value) for key, value in inputs.items()
             if key.startswith("w_")}
    attention.load_state_dict(state)
    twin = QuantDecoderAttention.from_float(attention, params["bits"], params["bits"])
    q, k = torch.from_numpy(inputs["q_in"]), torch.from_numpy(inputs["k_in"])
    with torch.no_grad():
        reference_map = twin.attention_map(q, k)
        choices = search_attention(twin, q, k, reference_map, PccConfig(theta=params["theta"]))
    got = {}
    for choice in choices:
        site, clip = choice.site, choice.choice
        quantizer = twin.get_submodule(f"{site}_quantizer")
        got[f"scores_{site}"] = np.array(clip.distances)
        got[f"chosen_{site}"] = np.array([clip.x_min, clip.x_max])
        got[f"scale_{site}"] = quantizer.scale.numpy()
        got[f"zero_point_{site}"] = quantizer.zero_point.numpy()
        got[f"candidates_{site}"] = np.array(clip.candidates)
    problems = compare(fixture, got, expected)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def saqsam_s_calibrated():
    """The shipped sam_tiny calibrated by `saqsam-s` (paper preset, W4A4) on the fixtures' two samples."""
    model = load_model("sam_tiny").model.eval()
    with np.load(PARITY / MODEL[0]["inputs_file"]) as data:
        raw = {key: data[key] for key in data.files}
    samples = []
    for index in range(MODEL[0]["params"]["samples"]):
        image = torch.from_numpy(raw[f"image{index}"]).permute(2, 0, 1)[None].float()
        samples.append(CalibrationSample(model.preprocess(image), torch.from_numpy(raw[f"boxes{index}"]).float()))
    qmodel = quantize_sam(model, 4, 4)
    method = SaqSamS(progress=False)
    record: dict[str, object] = {}
    for name, step in method.steps(qmodel, model, CalibrationSet(tuple(samples), "parity"), BitSpec(4, 4), 0):
        record[name] = step()
    return qmodel, record


def _model_values(qmodel, record: dict) -> dict[str, np.ndarray]:
    """Every recorded quantity of the calibrated model under the fixtures' `<what>__<site>` keys."""
    values: dict[str, np.ndarray] = {}
    for name, quantizer in quantizer_sites(qmodel).items():
        values[f"scale__{name}"] = quantizer.scale.detach().numpy()
        values[f"zero_point__{name}"] = quantizer.zero_point.detach().numpy()
        if quantizer.log2_tau is not None:
            values[f"tau__{name}"] = np.array(quantizer.log2_tau)
        elif quantizer.set_range_args is not None:
            values[f"min__{name}"], values[f"max__{name}"] = (np.array(float(v)) for v in quantizer.set_range_args)
    for path, decision in record["BIG"].items():
        values[f"bimodal__{path}"] = np.array(int(decision.bimodal))
        values[f"folded__{path}"] = np.array(int(decision.folded))
    for choice in record["activations"] or []:
        values[f"pcc_pass{choice.pass_index}__{choice.site}"] = np.array([choice.choice.x_min, choice.choice.x_max])
    return values


@pytest.mark.parametrize("fixture", MODEL, ids=[f["name"] for f in MODEL])
def test_saqsam_s_calibration_of_sam_tiny(fixture: dict, saqsam_s_calibrated) -> None:
    qmodel, record = saqsam_s_calibrated
    _, expected = load(fixture)
    compared = tuple(f"{what}__" for what in fixture["params"]["compared"])
    keys = [key for key in fixture["expected"] if key.startswith(compared)]
    values = _model_values(qmodel, record)
    problems = compare({**fixture, "expected": keys}, values, expected)
    assert len(problems) <= CHAOS_BUDGET[fixture["name"]], (
        f"{len(problems)} of {len(keys)} keys differ (at most {CHAOS_BUDGET[fixture['name']]} may):\n"
        + "\n".join(problems[:20]))
