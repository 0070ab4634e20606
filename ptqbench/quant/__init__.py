"""Method-agnostic quantization primitives: pure functions, observers, the FakeQuantizer, sites."""
