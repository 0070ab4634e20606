"""Models behind adapters: the spec and registry (`spec`), checkpoints (`checkpoints`), the
calibration data types (`calibration`), what a family provides (`adapter`), and one package per
family (SAM-1: `sam1/`, the only code that imports segment_anything)."""
