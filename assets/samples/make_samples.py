#!/usr/bin/env python3
"""Generates the bundled sample images (synthetic, no patient data; CC0 like the rest of this folder).

phantom-ct.png: a Shepp-Logan-style head phantom drawn with ellipses, 320x256 (non-square on purpose),
grey values as a soft-tissue-windowed CT slice would show them.
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def phantom() -> Image.Image:
    img = Image.new("L", (320, 256), 0)
    d = ImageDraw.Draw(img)
    d.ellipse([60, 18, 260, 238], fill=230)  # skull
    d.ellipse([70, 28, 250, 228], fill=110)  # brain
    d.ellipse([120, 70, 150, 160], fill=60)  # left ventricle
    d.ellipse([170, 70, 200, 160], fill=60)  # right ventricle
    d.ellipse([190, 170, 215, 195], fill=170)  # a bright lesion
    d.ellipse([145, 185, 175, 200], fill=95)
    return img.filter(ImageFilter.GaussianBlur(1.2))


if __name__ == "__main__":
    phantom().save(HERE / "phantom-ct.png", optimize=True)
