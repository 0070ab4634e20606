"""The SAM-1 family, the only package that imports segment_anything: its models (`models`) and
adapter (`adapter`), the quantizable twins, the calibration forward, box-prompt inference, the
reconstruction units and PAR's, the attention groups and encoder stages methods work on, and
automatic mask generation."""
