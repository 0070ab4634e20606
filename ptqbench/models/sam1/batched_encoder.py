"""SAM's image encoder over several images at once, bit-identical to encoding them one by one.

On a GPU a batch of images goes through the ViT faster than the same images one at a time,
because its GEMMs fill the device better (H200, SAM-H: 167 ms/image at batch 1, 144 at batch 4).
Bit-identity is what decides which parts may be batched. The transformer blocks are GEMMs
(cuBLAS) and row-wise or element-wise kernels, and on the H200 they return the same bits for a
batch as for its images one by one. The convolutions are different: cuDNN picks its algorithm
per shape, and a batched neck differs from single-image ones by up to 1.4e-5. So the patch
embedding and the neck run per image and only the blocks run on the batch.

That the blocks agree is a property of the kernels the libraries choose for each shape on a given
GPU, not a guarantee. `BatchedImageEncoder` therefore checks it. The first batch of each size is
also encoded image by image and compared bit for bit. If any bit differs, the encoder keeps the
single-image embeddings and encodes one image at a time from then on; it warns the first time this
happens in the process for a device and batch size (a grid builds an encoder per cell, and on a GPU
the same kernels disagree in every cell), later times only in the debug log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import Tensor

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, int]] = set()
"""(device, batch size) pairs whose fallback this process has warned about."""


class BatchedImageEncoder:
    """Encodes up to `batch_size` model inputs at once with the embeddings of `encoder(x)` per image.

    encoder: SAM's `ImageEncoderViT` (plain or with quantized twins swapped in).
    batch_size: images per batched trunk call; 1 encodes image by image.
    """

    def __init__(self, encoder: ImageEncoderViT, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"encoder batch size must be at least 1, got {batch_size}")
        self.encoder = encoder
        self.batch_size = batch_size
        self._verified_sizes: set[int] = set()

    @torch.no_grad()
    def __call__(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """inputs: model inputs [1, 3, S, S] -> their embeddings [1, 256, S/16, S/16], in order.

        Launches the work and returns (on a GPU, before it ran), except for the first batch of a
        size, whose check waits for the device.
        """
        embeddings: list[Tensor] = []
        while len(embeddings) < len(inputs):
            embeddings += self._encode_batch(inputs[len(embeddings):len(embeddings) + self.batch_size])
        return embeddings

    def _encode_batch(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        if len(inputs) == 1:
            return [self.encoder(inputs[0])]
        batched = self._batched_trunk(inputs)
        if len(inputs) in self._verified_sizes:
            return batched
        singles = [self.encoder(x) for x in inputs]
        if all(torch.equal(b, s) for b, s in zip(batched, singles)):
            self._verified_sizes.add(len(inputs))
            return batched
        seen = (str(inputs[0].device), len(inputs))
        log.log(logging.DEBUG if seen in _WARNED else logging.WARNING,
                "the image encoder's blocks give different bits for a batch of %d images than for the images "
                "one by one on %s; encoding one image at a time", len(inputs), inputs[0].device)
        _WARNED.add(seen)
        self.batch_size = 1
        return singles

    def _batched_trunk(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """`ImageEncoderViT.forward` with the patch embedding and the neck per image and the blocks on
        the concatenated tokens [B, h, w, C].

        The batch is stored contiguously, whereas `PatchEmbed` returns a permuted view of [B, C, h, w]
        storage and the blocks keep that layout. This changes no value: every matrix product in a
        block reads a LayerNorm, projection or window output, which is contiguous either way, and
        the additions are element-wise. It does make the residual additions vectorised and saves each
        LayerNorm a copy. The neck's convolution does depend on the layout, so each image reaches it
        as contiguous [1, C, h, w], as in the single-image path.
        """
        encoder = self.encoder
        x = torch.cat([encoder.patch_embed(image) for image in inputs])
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = block(x)
        return [encoder.neck(image_tokens.permute(0, 3, 1, 2).contiguous()) for image_tokens in x.split(1)]
