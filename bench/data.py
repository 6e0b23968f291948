"""The data-path stage: the tutorial's per-image PIL path against this project's cached uint8 path."""

from __future__ import annotations

import time
from pathlib import Path

from bench.child import peak_memory


def make_images(folder: Path, count: int, size: int = 256) -> None:
    """Photo-sized JPEGs (smooth random colour fields) so decoding costs what real files cost."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def tutorial_loader(folder: Path, resolution: int, batch_size: int):
    """The tutorial's data path: PIL + torchvision transforms per image in a DataLoader."""
    import torch
    from PIL import Image
    from torchvision import transforms

    preprocess = transforms.Compose(
        [
            transforms.Resize((resolution, resolution)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    files = sorted(folder.glob("*.jpg"))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return {"images": preprocess(Image.open(files[i]).convert("RGB"))}

    return torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=True)


def stage_data(folder: str, resolution: int, batch_size: int, batches: int) -> dict:
    """Images/s of both paths on the same JPEGs, and the one-off cost of building the cache."""
    import torch

    from ddpm.config import DataConfig
    from ddpm.data.batches import BatchLoader, BatchOrder, to_model_input
    from ddpm.data.cache import open_cache

    loader = tutorial_loader(Path(folder), resolution, batch_size)
    start, seen = time.perf_counter(), 0
    while seen < batches * batch_size:
        for batch in loader:
            seen += batch["images"].shape[0]
            if seen >= batches * batch_size:
                break
    pil = seen / (time.perf_counter() - start)

    cfg = DataConfig(
        source="folder",
        path=folder,
        resolution=resolution,
        random_flip=True,
        cache_dir=str(Path(folder).parent / "cache"),
    )
    start = time.perf_counter()
    cache = open_cache(cfg, show_progress=False)
    build_s = time.perf_counter() - start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(0)
    order = BatchOrder(len(cache), batch_size, seed=0)
    reader = BatchLoader(cache, order, 0, 0, pin_memory=device.type == "cuda")
    for _ in range(5):  # warm-up: thread start, first torch ops
        to_model_input(next(reader)[1], device, True, generator)
    start = time.perf_counter()
    for _ in range(batches * 10):
        _, images, _ = next(reader)
        to_model_input(images, device, True, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cached = batches * 10 * batch_size / (time.perf_counter() - start)
    reader.close()
    return {"pil_img_s": pil, "cached_img_s": cached, "cache_build_s": build_s, "images": len(cache), **peak_memory()}
