"""The cost of classifier-free guidance: sampling images/s of an unconditional UNet against the same UNet with a
class embedding, sampled at guidance scale 1 (one model call per step) and above 1 (both halves in one batched
forward, twice the batch).

Speed does not depend on what the weights learned, so the networks are the config's architecture with fresh weights:
the figure needs no trained model and reruns on a fresh clone. The three cases are interleaved, `repeats` rounds of
each, so that the machine's drift falls on all of them alike; the report gives the median of each and the ratio of
time per image to the unconditional model's.
"""

from __future__ import annotations

import statistics
import time

from bench.child import peak_memory

GUIDED_SCALE = 2.0  # any scale other than 0 and 1 runs both halves; 2 is the sweeps' usual middle


def stage_guidance(config: str, num_classes: int, batch: int, steps: int, repeats: int) -> dict:
    """img/s of each case (median of `repeats` interleaved rounds of `batch` images in one batch, `steps` steps of
    the default sampler, in the precision "auto" picks), and each case's time per image over the unconditional's."""
    import torch

    from ddpm.config import DEFAULT_SAMPLER, load_config
    from ddpm.device import resolve_placement
    from ddpm.models.schedule import build_scheduler
    from ddpm.models.unet import build_unet
    from ddpm.sampling.guidance import round_robin
    from ddpm.sampling.sample import generate, make_sampler

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    placement = resolve_placement(device, "auto")
    cfg = load_config(config, [])
    channels, res = cfg.data.image_channels, cfg.data.resolution
    cfg.model.num_classes = 0
    uncond = build_unet(cfg.model, res, channels).to(device).eval()
    cfg.model.num_classes = num_classes
    cond = build_unet(cfg.model, res, channels).to(device).eval()
    sampler = make_sampler(DEFAULT_SAMPLER, build_scheduler(cfg.schedule))
    seeds = list(range(batch))
    labels = round_robin(batch, num_classes)
    cases = {
        "unconditional": (uncond, None, 1.0),
        "conditional, scale 1": (cond, labels, 1.0),
        f"conditional, scale {GUIDED_SCALE:g}": (cond, labels, GUIDED_SCALE),
    }

    def seconds(unet, labels, scale) -> float:
        start = time.perf_counter()
        generate(unet, sampler, seeds, steps, batch, device, placement.autocast_dtype, labels=labels,
                 guidance_scale=scale)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Warm-up (first calls allocate and pick kernels), counting what each case asks of the network per step: the
    # batch of each model call, which the figures below are the price of.
    inputs_per_step = {}
    for name, (unet, case_labels, scale) in cases.items():
        batches: list[int] = []
        hook = unet.register_forward_pre_hook(lambda _module, args, seen=batches: seen.append(len(args[0])))
        generate(unet, sampler, seeds[:2], 2, 2, device, placement.autocast_dtype,
                 labels=None if case_labels is None else case_labels[:2], guidance_scale=scale)  # fmt: skip
        hook.remove()
        inputs_per_step[name] = sum(batches) / 2 / 2  # images the network sees per step per sampled image
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            times[name].append(seconds(*case))
    base = statistics.median(times["unconditional"])
    rows = [
        {
            "case": name,
            "img_s": batch / statistics.median(ts),
            "img_s_runs": [batch / t for t in ts],
            "time_ratio": statistics.median(ts) / base,
            "inputs_per_image_step": inputs_per_step[name],
        }
        for name, ts in times.items()
    ]
    return {
        "rows": rows,
        "config": config,
        "num_classes": num_classes,
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "sampler": DEFAULT_SAMPLER,
        "precision": placement.precision,
        "threads": torch.get_num_threads(),
        **peak_memory(),
    }
