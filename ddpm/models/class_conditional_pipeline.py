"""A diffusers pipeline for a class-conditional UNet2DModel with classifier-free guidance (Ho & Salimans 2022).

This file is saved with every class-conditional export as `pipeline.py`, and model_index.json names it
(`"_class_name": ["pipeline", "ClassConditionalDDPMPipeline"]`), so plain diffusers loads the export, from a local
directory or from the Hub, with

    pipe = DiffusionPipeline.from_pretrained(path_or_repo, trust_remote_code=True)
    images = pipe(class_labels=["3", "7"], guidance_scale=2.0, num_inference_steps=25).images

It imports diffusers and torch only (it runs outside this project). The UNet's class embedding has one entry more
than classes: the last is the null class, the unconditional prediction. DiT's pipeline convention: `id2label` in
model_index.json, `get_label_ids` from names.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        classes = (unet.config.num_class_embeds or 1) - 1  # less the null class
        id2label = {str(k): str(v) for k, v in (id2label or {str(i): str(i) for i in range(classes)}).items()}
        self.register_to_config(id2label=id2label)
        self.labels = {name: int(i) for i, name in id2label.items()}  # name -> class index, as DiTPipeline's

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class indices of class names (model_index.json's id2label)."""
        names = [label] if isinstance(label, str) else label
        for name in names:
            if name not in self.labels:
                raise ValueError(f"{name!r} is not a class of this model; classes: {', '.join(self.labels)}")
        return [self.labels[name] for name in names]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """One image per entry of `class_labels` (indices or names). `guidance_scale`: 1 is the conditional model
        alone (one pass per step), 0 the unconditional one; any other scale s runs both halves in one batched forward
        and takes uncond + s * (cond - uncond) (Ho & Salimans 2022, eq. 6 with w = s - 1)."""
        items = class_labels if isinstance(class_labels, (list, tuple)) else [class_labels]
        ids = [self.get_label_ids(c)[0] if isinstance(c, str) else int(c) for c in items]
        null = self.unet.config.num_class_embeds - 1
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a non-negative number, got {guidance_scale}")
        if any(not 0 <= i < null for i in ids):
            raise ValueError(f"class labels must lie in 0..{null - 1}, got {ids}")
        labels = torch.tensor(ids, device=self.device)
        size = self.unet.config.sample_size
        shape = (len(ids), self.unet.config.in_channels, size, size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(image, t)
            if guidance_scale == 1.0:
                pred = self.unet(x, t, class_labels=labels).sample
            elif guidance_scale == 0.0:
                pred = self.unet(x, t, class_labels=torch.full_like(labels, null)).sample
            else:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, null)]))
                cond, uncond = both.sample.chunk(2)
                pred = uncond + (cond - uncond) * guidance_scale
            kwargs = {"generator": generator} if takes_generator else {}
            image = self.scheduler.step(pred.float(), t, image, **kwargs).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
