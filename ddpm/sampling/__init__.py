"""Reverse diffusion: the samplers on a model's trained schedule, the sampling loop with one generator per image,
and any diffusers pipeline loaded by Hub id or path (text-to-image included).

Uses models/; used by evaluation and training."""
