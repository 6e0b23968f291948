"""Doctor job: what a user checks before a week-long job, on one screen, each line with a verdict.

ddpm doctor                       # here, in the container, or as `srun ... ddpm doctor` on a node
ddpm doctor --expect-gpus 8       # fails in one line when fewer GPUs are usable
"""

from __future__ import annotations

from dataclasses import dataclass

from ddpm.errors import UserError


@dataclass
class DoctorConfig:
    expect_gpus: int = 0  # fail when fewer usable GPUs are visible (0: no expectation)

    def validate(self) -> None:
        if self.expect_gpus < 0:
            raise UserError(f"--expect-gpus must be non-negative, got {self.expect_gpus}")


CONFIG = DoctorConfig


def run(cfg: DoctorConfig) -> list:
    from ddpm.environment import checks

    cfg.validate()
    found = checks(cfg.expect_gpus)
    print("\n".join(c.line() for c in found), flush=True)
    failed = [c for c in found if c.status == "fail"]
    if failed:
        raise UserError(f"{len(failed)} check(s) failed: " + "; ".join(f"{c.name}: {c.verdict}" for c in failed))
    return found
