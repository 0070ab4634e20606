"""The fused relative-position add is bit-identical to segment_anything's two broadcasting adds."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from ptqbench.models.sam1.fused_rel_pos import HAS_TRITON, add_rel_pos_, can_fuse
from ptqbench.models.sam1.quantized import add_rel_pos, fp_twin

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="the fused add needs a GPU")


def test_cpu_and_autograd_keep_the_two_pass_add():
    logits = torch.zeros(2, 16, 16)
    assert not can_fuse(logits)
    if torch.cuda.is_available():
        assert not can_fuse(logits.cuda())  # autograd is on here


def test_non_contiguous_logits_are_refused():
    logits = torch.zeros(2, 16, 16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"not a contiguous \[2, 16, 16\]"):
        add_rel_pos_(logits, torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))


@needs_cuda
@pytest.mark.parametrize("batch, side, dim", [(4 * 12, 14, 64), (2 * 16, 64, 80), (3, 5, 8)])
def test_fused_add_equals_segment_anything(batch, side, dim):
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, side * side, dim, device="cuda", generator=generator)
    logits = torch.randn(batch, side * side, side * side, device="cuda", generator=generator)
    rel_pos_h = torch.randn(2 * side - 1, dim, device="cuda", generator=generator)
    rel_pos_w = torch.randn(2 * side - 1, dim, device="cuda", generator=generator)
    with torch.no_grad():
        expected = add_decomposed_rel_pos(logits.clone(), q, rel_pos_h, rel_pos_w, (side, side), (side, side))
        assert can_fuse(logits)
        fused = add_rel_pos(logits, q, rel_pos_h, rel_pos_w, (side, side))
    assert fused.data_ptr() == logits.data_ptr()  # in place
    assert torch.equal(fused, expected)


@needs_cuda
def test_twin_encoder_on_the_gpu_equals_segment_anything(sam_tiny):
    model = sam_tiny.cuda()
    twin = fp_twin(model)
    image = torch.randn(2, 3, model.image_encoder.img_size, model.image_encoder.img_size, device="cuda")
    with torch.no_grad():
        assert torch.equal(twin.image_encoder(image), model.image_encoder(image))
