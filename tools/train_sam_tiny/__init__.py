"""Train `sam_tiny` from scratch on freshly generated synthetic scenes, SAM-style.

Data: DataLoader workers draw endless scenes of the three demo families from
`ptqbench.demo`, at the sizes the demo evaluation uses:

- coco: `object_scene`, 240-320 x 320-400 (20% portrait); instances = the visible masks;
- dota: `aerial_scene`, 480-545 square-ish, cut into `DOTA_CROPS` random crops of the model
  input size (the DOTA task runs SAM on windows of that side); instances = the objects' parts
  inside the crop (at least `DOTA_MIN_AREA` pixels);
- ade: `region_scene`, 240-272 x 304-336; instances = the 8-connected components of every label
  (clutter `0` included) with at least `ADE_MIN_AREA` pixels, as the ADE20K task's box prompts.

Each scene goes through SAM's own preprocessing: `ResizeLongestSide(input)` for the image,
masks resized alike (pixel area, kept where covered >= 1/2), then `Sam.preprocess` (normalise,
pad) on the device.

Generated scenes enter a replay pool on the device (FIFO, `--pool` scenes); every step samples
`--batch` scenes of the pool, and `--prompts` instances per scene with fresh prompts, so the GPU
never waits for the CPU and each scene is reused with new prompts about (GPU rate / CPU rate)
times.

Prompts per scene (fixed shares, random instances): half are boxes (the tight box plus noise of
std 10% of the side per coordinate, at most 20 original pixels; `EXACT_BOX_SHARE` of the boxes
are left tight, as the evaluation's GT boxes are), 3/8 single foreground points, 1/8 three
points (one foreground, each other one foreground or background at random). As in SAM, a
single point is ambiguous: the decoder's three multimask outputs are trained with the
minimum-loss one only; boxes and several points train the single-mask output.

Loss: 20 * focal + dice per mask (on the low-res logits upsampled to the input size, the way
`Sam.postprocess_masks` does first), plus the MSE between the IoU head and the actual IoU of
each predicted mask (all produced outputs). AdamW, linear warm-up, cosine decay over the
training progress (the larger of steps / `--max-steps` and time / budget, so the schedule
ends when the time budget does), gradient clipping, bf16 autocast on the GPU (the prompt and
positional encodings stay float32, as at inference).

Two pieces re-express segment_anything code for batching, each tested equal to the original:
`decode` (`MaskDecoder.predict_masks` for prompts of many images in one call; the original
takes one image) and `embed_points` (the prompt encoder's point embedding without its
boolean-mask assignments, which would each stall the GPU queue).

Logs into `--log-dir`: `train_log.csv` (step, time, lr, losses, throughput), `val_log.csv`
(box-prompted mIoU per family on held-out generated scenes, through `BoxPredictor`: the
evaluation's own inference path) and `metrics.json` (final validation, steps, sha256). The
weights go to `--out` as a float16 state dict (at most `MAX_CHECKPOINT_BYTES`); the last line
printed is its sha256, for `SAM_TINY_SHA256`.

Seeded: the init, the data stream of every worker, the replay and prompt sampling and the
validation scenes derive from `--seed`; with workers the mix of fresh and replayed scenes
depends on timing, so two runs are not bit-identical.

The package: `config` (settings and constants), `scenes` (generation, stream, replay pool),
`prompts` (a step's prompts), `sam_forward` (the batched re-expressions), `loss`, `training` (the
loop, validation, logs, checkpoint) and `__main__` (the command line).

Usage (see tools/README.md; the weights then go to ptqbench/data/sam_tiny.pt), from the
repository root:
    python3 -m tools.train_sam_tiny --out $OUT/sam_tiny.pt --log-dir $OUT --minutes 8 --device cuda
"""
