"""A named block of the user's scrontab: one command line on a schedule, as a SLURM CPU job of a cluster profile.

The block sits between `# ddpm <name>: begin` and `# ddpm <name>: end`; installing it again replaces it, and the
rest of the scrontab is kept. Where there is no scrontab (or SLURM refuses it), the line is printed for `crontab -e`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ddpm.errors import UserError
from slurm.profile import ClusterProfile


def markers(name: str) -> tuple[str, str]:
    return f"# ddpm {name}: begin", f"# ddpm {name}: end"


def install(name: str, line: str, profile: ClusterProfile) -> None:
    """Put `line` (`<cron schedule> <command>`) into the scrontab as block `name`, with the profile's CPU partition,
    time limit and account; prints what it did, or the line to add by hand where scrontab is not available."""
    if shutil.which("scrontab") is None:
        print(f"scrontab is not installed here; add this line with `crontab -e` on a login node instead:\n{line}")
        return
    current = subprocess.run(["scrontab", "-l"], capture_output=True, text=True)
    if current.returncode != 0 and "no crontab" not in (current.stderr + current.stdout).lower():
        print(
            f"scrontab is not available here ({current.stderr.strip() or 'exit ' + str(current.returncode)}); "
            f"add this line with `crontab -e` on a login node instead:\n{line}"
        )
        return
    begin, end = markers(name)
    kept, inside = [], False
    for existing in current.stdout.splitlines() if current.returncode == 0 else []:
        if existing.strip() == begin:
            inside = True
        if not inside:
            kept.append(existing)
        if existing.strip() == end:
            inside = False
    block = [
        begin,
        f"#SCRON --partition={profile.cpu_job.partition or profile.partition}",
        f"#SCRON --time={profile.cpu_job.time_min}",
        *([f"#SCRON --account={profile.account}"] if profile.account else []),
        line,
        end,
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as f:
        f.write("\n".join([*kept, *block]) + "\n")
    r = subprocess.run(["scrontab", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if r.returncode != 0:
        raise UserError(
            f"scrontab refused the entry ({r.stderr.strip()}); add this line with `crontab -e` instead: {line}"
        )
    print(f"installed in scrontab (see `scrontab -l`):\n{line}")
