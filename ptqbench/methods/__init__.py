"""PTQ methods, one file each; importing this package registers the built-in methods."""

from ptqbench.methods import fp, minmax, mse, percentile  # noqa: F401  (registration)
