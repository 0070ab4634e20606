"""PTQ methods, one file each; importing this package registers the built-in methods."""

from ptqbench.methods import brecq, fp, minmax, mse, percentile, ptq4sam, qdrop, saqsam  # noqa: F401  (registration)
