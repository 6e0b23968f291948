"""A data set unlike the digits, to fine-tune the digits model on: capital letters rendered with matplotlib's bundled
DejaVu fonts at a random size, offset and rotation, dark on light, grey, saved as PNGs (docs/benchmarks.md,
"Fine-tuning against training from scratch").

Run: python -m bench.glyphs OUT [--count 2000] [--size 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

# The 4 faces x 26 capitals; no digits, so the fine-tuned model has to learn shapes its base never saw.
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
LETTERS = string.ascii_uppercase
SUPERSAMPLE = 4  # drawn at 4x the side, then downsampled: antialiased strokes like the upsampled digits'


def render_glyphs(out: Path, count: int = 2000, size: int = 16, seed: int = 0) -> list[Path]:
    """`count` PNGs `glyph-NNNNN.png` of `size` px in `out`; the same files for the same arguments."""
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    fonts_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        letter = LETTERS[rng.integers(len(LETTERS))]
        font = ImageFont.truetype(str(fonts_dir / FONTS[rng.integers(len(FONTS))]), int(big * rng.uniform(0.55, 0.85)))
        canvas = Image.new("L", (big, big), 255)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        dx, dy = rng.uniform(-0.1, 0.1, size=2) * big  # up to a tenth of the side off centre
        draw.text(((big - (right - left)) / 2 - left + dx, (big - (bottom - top)) / 2 - top + dy), letter, 0, font)
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, fillcolor=255)
        path = out / f"glyph-{i:05d}.png"
        canvas.resize((size, size), Image.Resampling.LANCZOS).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the PNGs to")
    parser.add_argument("--count", type=int, default=2000, help="images")
    parser.add_argument("--size", type=int, default=16, help="side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seeds letter, face, size, offset and rotation")
    args = parser.parse_args(argv)
    paths = render_glyphs(args.out, args.count, args.size, args.seed)
    print(f"{len(paths)} glyphs of {args.size} px in {args.out}")


if __name__ == "__main__":
    main()
