"""The Segment Anything Model: builders, checkpoints, quantizable twins and box-prompt inference."""
