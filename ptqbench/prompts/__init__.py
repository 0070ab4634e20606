"""Prompt generators: the papers' protocol from the field's own libraries.

`ptqbench prompts coco` runs a detector of torchvision's model zoo over a COCO split and writes
the COCO detection results file that `--prompts` reads (`coco.py`, `detector.py`, `weights.py`,
the names and settings in `zoo.py`); `ptqbench prompts ade20k` runs a SegFormer ADE20K
checkpoint of Hugging Face `transformers` with SSA's preprocessing and writes the class-map PNG
folder that the ADE20K task's `mode=ssa` reads (`segformer.py`, `ade20k.py`). Both are cached
under `$PTQBENCH_CACHE/prompts/` (`cache.py`), keyed by the model, its weights' hash, the split,
the data and the settings, so a second run reuses the file. `protocol.py` is what
`ptqbench run --protocol paper` asks for its prompts; `command.py` the `ptqbench prompts` command.

Nothing here imports torch, torchvision or transformers at module level: the command line checks
names and settings first.
"""
