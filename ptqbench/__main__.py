"""`python -m ptqbench` (also what `torchrun -m ptqbench` runs)."""

import sys

from ptqbench.cli import main

sys.exit(main())
