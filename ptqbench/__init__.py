"""ptqbench: post-training quantization methods for the Segment Anything Model, on one fair harness."""

__version__ = "0.1.0"
