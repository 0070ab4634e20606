"""Evaluation tasks, one file each; `ptqbench.tasks.base.TASKS` imports a task's module on its first use."""
