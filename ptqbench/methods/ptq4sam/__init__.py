"""PTQ4SAM (Lv et al., CVPR 2024): the methods (`method`: `ptq4sam-s`, `ptq4sam`) and their two
parts, BIG (`big`: the sign fold of bimodal keys) and AGQ (`agq`: the log2 softmax grid search)."""
