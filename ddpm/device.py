"""Where a job runs and in which precision: one resolver for training, sampling, evaluation and generation.

"auto" means one thing everywhere: bf16 where the hardware computes in it (CUDA GPUs with bf16; CPUs with
AVX512-BF16 or AMX, where `ddpm bench --ablation` measured 1.4x fp32 on the tutorial UNet's training step),
fp16 on CUDA GPUs without bf16, fp32 elsewhere. Training and sampling use it as an autocast dtype over fp32
weights; `ddpm generate` loads a whole pipeline in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # fp32, bf16 or fp16

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast to over fp32 weights, or None for plain fp32."""
        return None if self.precision == "fp32" else self.dtype

    @property
    def accelerate_precision(self) -> str:
        """accelerate's name for it ("no" is fp32)."""
        return "no" if self.precision == "fp32" else self.precision


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when present, else the CPU; a device that does not exist here is refused in one line."""
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA GPU is visible on this machine")
    return dev


def resolve_placement(device: str | torch.device = "auto", precision: str = "auto") -> Placement:
    """The device and precision a job runs in; a precision the device cannot run is refused, naming the fix."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if precision == "auto":
        precision = auto_precision(dev)
    if precision not in DTYPES:
        raise UserError(f"precision {precision!r} is not one of auto, {', '.join(DTYPES)}")
    if precision == "fp16" and dev.type == "cpu":
        raise UserError(
            "precision fp16 does not run on the CPU (half-precision convolutions are missing there); use fp32 or bf16"
        )
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"precision bf16: this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16; use fp16")
    return Placement(dev, precision)
