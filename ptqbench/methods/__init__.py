"""PTQ methods, one file each; `ptqbench.methods.base.METHODS` imports a method's module on its first use."""
