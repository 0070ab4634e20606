"""BatchedImageEncoder: the batched trunk returns what the encoder returns image by image, and
checks that it does before trusting it."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ptqbench.models.sam1 import batched_encoder
from ptqbench.models.sam1.batched_encoder import BatchedImageEncoder


def _inputs(encoder, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = encoder.img_size
    return [torch.randn(1, 3, size, size, generator=generator) for _ in range(count)]


def _count_full_forwards(encoder) -> list[int]:
    calls = [0]
    encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


class BatchMixing(nn.Module):
    """A block whose output for one image depends on the other images of its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.mean(dim=0, keepdim=True)


def test_batched_embeddings_equal_single_image_ones(sam_tiny):
    encoder = sam_tiny.image_encoder
    inputs = _inputs(encoder, 5)
    with torch.no_grad():
        expected = [encoder(x) for x in inputs]
    embeddings = BatchedImageEncoder(encoder, batch_size=2)(inputs)
    assert len(embeddings) == 5
    for embedding, reference in zip(embeddings, expected):
        assert embedding.shape == (1, 256, encoder.img_size // 16, encoder.img_size // 16)
        assert torch.equal(embedding, reference)


def test_only_the_first_batch_of_each_size_is_also_encoded_image_by_image(sam_tiny):
    """With row-wise blocks (batch-invariant on any device) the check runs once per batch size."""
    encoder = sam_tiny.image_encoder
    encoder.blocks = nn.ModuleList([nn.LayerNorm(encoder.patch_embed.proj.out_channels)])
    encoder.neck = nn.Identity()
    full_forwards = _count_full_forwards(encoder)
    batched = BatchedImageEncoder(encoder, batch_size=2)
    batched(_inputs(encoder, 2))
    assert full_forwards[0] == 2
    batched(_inputs(encoder, 5))  # two verified batches of 2, then a single image
    assert full_forwards[0] == 3
    assert batched.batch_size == 2


def test_batch_dependent_blocks_fall_back_to_single_images_and_warn_once(sam_tiny, caplog, monkeypatch):
    encoder = sam_tiny.image_encoder
    encoder.blocks.append(BatchMixing())
    inputs = _inputs(encoder, 3)
    with torch.no_grad():
        expected = [encoder(x) for x in inputs]
    monkeypatch.setattr(batched_encoder, "_WARNED", set())
    batched = BatchedImageEncoder(encoder, batch_size=3)
    with caplog.at_level(logging.DEBUG, logger="ptqbench.models.sam1.batched_encoder"):
        embeddings = batched(inputs)
        again = BatchedImageEncoder(encoder, batch_size=3)  # the next cell's encoder: checked again, warned once
        assert all(torch.equal(e, r) for e, r in zip(again(inputs), expected)) and again.batch_size == 1
    fallbacks = [record.levelno for record in caplog.records if "different bits for a batch of 3 images" in
                 record.getMessage()]
    assert fallbacks == [logging.WARNING, logging.DEBUG]
    assert all(torch.equal(e, r) for e, r in zip(embeddings, expected))
    assert batched.batch_size == 1


def test_batch_size_must_be_positive(sam_tiny):
    with pytest.raises(ValueError, match="at least 1, got 0"):
        BatchedImageEncoder(sam_tiny.image_encoder, batch_size=0)
