"""Training: the loop in EDM's phases and its set-up, the training state a checkpoint saves and restores, the EMA,
the one-live-run lock, and one process per GPU on this machine.

The top of the library: uses data/, models/, sampling/ (grids) and evaluation/ (in-training scores)."""
