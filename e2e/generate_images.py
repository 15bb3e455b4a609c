"""Test images, made here (no downloads): synthetic scenes in JPEG, PNG and WebP, in the modes
real uploads come in, and hostile files (truncated, a decompression bomb, not an image).

    python -m e2e.generate_images DIR
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def scene(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a few filled shapes and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / rng.uniform(1, 6)) + rng.uniform(0, 6)),
            128 + 100 * np.cos(y / (height / rng.uniform(1, 6)) + rng.uniform(0, 6)),
            128 + 80 * np.sin((x + y) / (width / rng.uniform(1, 4))),
        ],
        axis=-1,
    )
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        base[mask] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height pixels (tens of gigabytes decoded) in a few
    dozen bytes: a server must refuse it from the header, before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def generate(directory: Path) -> dict[str, Path]:
    """Write the images into `directory`; return their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    photo = scene(640, 480, 1)
    files = {
        "photo.jpg": encode(photo, "JPEG", quality=88),
        "wide.png": encode(scene(300, 120, 2), "PNG"),
        "small.webp": encode(scene(40, 56, 3), "WEBP", quality=90),
        "gray.jpg": encode(scene(200, 200, 4).convert("L"), "JPEG", quality=90),
        "alpha.png": encode(scene(128, 96, 5).convert("RGBA"), "PNG"),
        "palette.png": encode(scene(64, 64, 6).convert("P"), "PNG"),
        "tiny.png": encode(scene(3, 2, 7), "PNG"),
        # hostile or unsupported
        "truncated.jpg": encode(photo, "JPEG", quality=88)[:6000],
        "bomb.png": png_bomb(),
        "animation.gif": encode(scene(32, 32, 8), "GIF"),
        "not-an-image.jpg": b"<html>this is not an image</html>",
    }
    paths = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        paths[name] = path
    return paths


if __name__ == "__main__":
    for name, path in generate(Path(sys.argv[1] if len(sys.argv) > 1 else "images")).items():
        print(f"{name}\t{path}")
