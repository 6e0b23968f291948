"""SLURM: cluster profiles, submitit launchers and the callables that run on the nodes (see docs/slurm.md)."""
