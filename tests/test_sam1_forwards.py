"""The SAM-1 adapter's restatements of SAM's forward equal the forward they restate, bit for bit."""

from __future__ import annotations

import torch

from ptqbench.models.calibration import CalibrationSample
from ptqbench.models.sam1.adapter import ADAPTER
from ptqbench.models.sam1.calibration import forward_with_graph, sample_forward


def test_forward_with_graph_is_the_calibration_forward_with_gradients_to_every_tensor(sam_tiny):
    generator = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0], [60.0, 30.0, 200.0, 90.0], [5.0, 5.0, 250.0, 250.0]])
    sample = CalibrationSample(torch.randn(1, 3, 256, 256, generator=generator), boxes)
    twin = ADAPTER.quantized_twin(sam_tiny, 4, 4)
    with torch.no_grad():
        expected, _ = sample_forward(twin, sample)
    embedding = {}
    handle = twin.image_encoder.register_forward_hook(lambda module, args, output: embedding.update(x=output))
    logits = forward_with_graph(twin, sample)
    handle.remove()
    assert torch.equal(logits.detach(), expected) and logits.shape == (3, 1, 64, 64)
    grad, = torch.autograd.grad(logits.square().sum(), embedding["x"])
    assert grad.abs().sum() > 0
    assert ADAPTER.forward_with_graph(twin, sample).requires_grad
