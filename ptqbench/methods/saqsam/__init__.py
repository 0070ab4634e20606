"""SAQ-SAM (Zhang et al., AAAI 2026): the methods (`method`: `saqsam-s`, `saqsam`) and their two
parts, PCC (`pcc`: the perceptual-consistency clipping of the decoder's QK sites) and PAR (`par`:
prompt-aware reconstruction)."""
