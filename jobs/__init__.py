"""One module per job. Each defines a typed dataclass config (`CONFIG`), a plain picklable `run(cfg)`, and
optionally `load(path, overrides, values)` when building its config needs more than the strict defaults
(ddpm.typed_config.load_job_config). `jobs.cli` (the `ddpm` command) calls `run(cfg)` here, and `jobs.submit`
hands the same `run` to `slurm/`, which calls it on the nodes without importing anything from jobs/."""
