"""The SAM-1 adapter: the only package that imports segment_anything. Builders and checkpoints,
quantizable twins, the calibration forward, box-prompt inference, the reconstruction units, the
attention groups and encoder stages methods work on, and automatic mask generation."""
