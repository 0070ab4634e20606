"""PTQ methods, one module each (a folder for a composite method: `ptq4sam/`, `saqsam/`), each a
configuration plus an algorithm; `ptqbench.methods.base.METHODS` imports a method's module on its
first use."""
