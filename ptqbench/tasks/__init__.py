"""Evaluation tasks, one file each; importing this package registers the built-in tasks."""

from ptqbench.tasks import ade20k, coco, dota  # noqa: F401  (registration)
