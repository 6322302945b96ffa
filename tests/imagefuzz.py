"""A seeded fuzzer for the one image opener (pipeline.images.decode_image): small files of every format
PIL can open, mutated, each decoded under a time limit. Used by tests/test_hostile_images.py (a few
thousand mutations) and bench/fuzz_images.py (as many as asked).

What counts as a failure: any exception other than ImageError leaving decode_image (a crash of the shard
stage), or one decode taking longer than the time limit (a hang). PIL writes most formats itself; the
others (PSD, FITS, SUN, XPM, ...) are built here byte by byte, the smallest file each plugin opens.
"""
from __future__ import annotations

import functools
import io
import random
import signal
import struct
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.images import ImageError, decode_image, openable_formats

W, H = 24, 16


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)      # IM: deprecated, still opened
        image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _picture(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def _le32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def _be32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _hand_made() -> dict[str, bytes]:
    """The smallest file of each format PIL opens but does not write (or writes only with a plug-in)."""
    rgb = _picture().tobytes()
    gray = _picture("L").tobytes()
    ico = _saved(_picture(), "ICO", sizes=[(16, 16)], bitmap_format="bmp")
    icon = _saved(_picture("RGBA").resize((16, 16)), "PNG")
    fits_cards = [b"SIMPLE  =                    T", b"BITPIX  =                    8", b"NAXIS   =                    2",
                  f"NAXIS1  = {W:20d}".encode(), f"NAXIS2  = {H:20d}".encode(), b"END"]
    fits_header = b"".join(card.ljust(80) for card in fits_cards).ljust(2880)
    psd = (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, H, W, 8, 3) + b"\0" * 12 + struct.pack(">H", 0)
           + bytes(b for channel in range(3) for b in rgb[channel::3]))
    fli_header = bytearray(128)
    struct.pack_into("<IHHHHHH", fli_header, 0, 0, 0xAF12, 1, W, H, 8, 0)
    frame = struct.pack("<IHH8x", 16 + 6 + W * H, 0xF1FA, 1) + struct.pack("<IH", 6 + W * H, 16) + gray
    gbr = _be32(28, 2, W, H, 1) + b"GIMP" + _be32(10) + gray
    mcidas = bytearray(256)
    mcidas[:8] = b"\0\0\0\0\0\0\0\x04"
    words = {9: H, 10: W, 11: 1, 14: 1, 15: 0, 34: 256}
    for index, value in words.items():
        struct.pack_into(">i", mcidas, (index - 1) * 4, value)
    pixar = bytearray(512)
    pixar[:4] = b"\x80\xe8\x00\x00"
    struct.pack_into("<HH", pixar, 416, H, W)
    struct.pack_into("<HH", pixar, 424, 14, 2)
    ftex = b"FTEX" + _le32(1, W, H, 1, 1, 1, 32) + _le32(len(rgb)) + rgb     # uncompressed RGB
    iptc = b"".join(b"\x1c" + bytes(tag) + struct.pack(">H", len(value)) + value
                    for tag, value in (((3, 60), b"\x01\x00"), ((3, 20), struct.pack(">H", W)),
                                       ((3, 30), struct.pack(">H", H)), ((3, 120), b"\x01")))
    iptc += b"\x1c\x08\x0a\x00\x00"
    xpm = (b'/* XPM */\nstatic char *x[] = {\n"%d %d 2 1",\n"a c #FF0000",\n"b c #00FF00",\n' % (W, H)
           + b"".join(b'"' + (b"ab" * (W // 2)) + b'",\n' for _ in range(H)) + b"};\n")
    pcd = bytearray(96 * 2048 + 768 * 512 * 3 // 2)
    pcd[2048:2048 + 7] = b"PCD_IPI"
    return {
        "CUR": b"\0\0\2\0" + ico[4:],
        "DCX": _le32(987654321, 12, 0) + _saved(_picture(), "PCX"),
        "FITS": fits_header + gray.ljust(2880, b"\0"),
        "FLI": bytes(fli_header) + frame,
        "FTEX": ftex,
        "GBR": gbr,
        "IMT": b"width %d\nheight %d\npixel n8\n\x0c" % (W, H) + gray,
        "IPTC": iptc + gray,
        "MCIDAS": bytes(mcidas) + gray,
        "MPEG": b"\x00\x00\x01\xb3" + bytes([W >> 4, ((W & 15) << 4) | (H >> 8), H & 255]) + b"\0" * 64,
        "PCD": bytes(pcd),
        "PIXAR": bytes(pixar) + b"\0" * 512 + rgb,
        "PSD": psd,
        "SUN": _be32(0x59A66A95, W, H, 24, len(rgb), 1, 0, 0) + rgb,
        "XPM": xpm,
        "XVTHUMB": b"P7 332\n#XVVERSION:Version 2.28\n#END_OF_COMMENTS\n%d %d 255\n" % (W, H) + gray,
        "BUFR": b"BUFR" + b"\0" * 60,
        "GRIB": b"GRIB\0\0\0\x01" + b"\0" * 60,
        "HDF5": b"\x89HDF\r\n\x1a\n" + b"\0" * 60,
        "ICNS": b"icns" + _be32(8 + 8 + len(icon)) + b"icp4" + _be32(8 + len(icon)) + icon,   # one 16x16 PNG
        "WMF": (b"\xd7\xcd\xc6\x9a\x00\x00" + struct.pack("<hhhhHIH", 0, 0, W * 20, H * 20, 1440, 0, 0)
                + b"\x01\x00\x09\x00" + b"\0" * 80),
    }


@functools.lru_cache(maxsize=1)
def seed_files() -> dict[str, bytes]:
    """name -> a small valid file; names start with the PIL format (several flavours of the common ones)."""
    rgb, rgba, gray, palette = _picture(), _picture("RGBA"), _picture("L"), _picture("P")
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotated: exif_transpose runs
    seeds = {
        "JPEG": _saved(rgb, "JPEG"), "JPEG-progressive-exif": _saved(rgb, "JPEG", progressive=True, exif=exif),
        "JPEG-cmyk": _saved(rgb.convert("CMYK"), "JPEG"), "JPEG-gray": _saved(gray, "JPEG"),
        "MPO": _saved(rgb, "MPO", save_all=True, append_images=[gray.convert("RGB")]),
        "PNG": _saved(rgb, "PNG"), "PNG-rgba-interlaced": _saved(rgba, "PNG", interlace=1),
        "PNG-palette": _saved(palette, "PNG"), "PNG-16bit": _saved(gray.convert("I;16"), "PNG"),
        "PNG-animated": _saved(rgb, "PNG", save_all=True, append_images=[gray.convert("RGB")]),
        "WEBP": _saved(rgb, "WEBP"), "WEBP-lossless-alpha": _saved(rgba, "WEBP", lossless=True),
        "WEBP-animated": _saved(rgb, "WEBP", save_all=True, append_images=[gray.convert("RGB")]),
        "GIF": _saved(rgb, "GIF"), "GIF-animated": _saved(rgb, "GIF", save_all=True, append_images=[gray]),
        "BMP": _saved(rgb, "BMP"), "BMP-palette": _saved(palette, "BMP"), "DIB": _saved(rgb, "DIB"),
        "TIFF": _saved(rgb, "TIFF"), "TIFF-lzw": _saved(rgb, "TIFF", compression="tiff_lzw"),
        "TIFF-deflate-alpha": _saved(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "TIFF-jpeg": _saved(rgb, "TIFF", compression="jpeg"), "TIFF-packbits": _saved(gray, "TIFF", compression="packbits"),
        "TIFF-tiled": _saved(rgb, "TIFF", tile=(16, 16)),
        "TIFF-multipage": _saved(rgb, "TIFF", save_all=True, append_images=[gray.convert("RGB")]),
        "AVIF": _saved(rgb, "AVIF"), "JPEG2000": _saved(rgb, "JPEG2000"),
        "JPEG2000-j2k": _saved(rgb, "JPEG2000", no_jp2=True),
        "DDS": _saved(rgb, "DDS"), "DDS-dxt1": _saved(rgba, "DDS", pixel_format="DXT1"),
        "ICO": _saved(rgb, "ICO", sizes=[(16, 16)]),
        "IM": _saved(rgb, "IM"), "MSP": _saved(rgb.convert("1"), "MSP"), "PCX": _saved(rgb, "PCX"),
        "PPM": _saved(rgb, "PPM"), "PPM-pgm": _saved(gray, "PPM"), "QOI": _saved(rgb, "QOI"),
        "SGI": _saved(rgb, "SGI"), "SPIDER": _saved(gray.convert("F"), "SPIDER"),
        "TGA": _saved(rgb, "TGA"), "TGA-rle": _saved(rgb, "TGA", compression="tga_rle"),
        "XBM": _saved(rgb.convert("1"), "XBM"), "BLP": _saved(palette, "BLP"),
        "BLP1": _saved(palette, "BLP", blp_version="BLP1"), "EPS": _saved(rgb, "EPS"),
    }
    seeds.update(_hand_made())
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flipped bits, bytes set to edge values, a 16/32-bit field set to an extreme,
    a cut, a stretch removed, repeated or inserted."""
    out = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
    elif kind == 2 and len(out) >= 4:
        i = rng.randrange(min(len(out) - 3, 512))           # headers hold the sizes and offsets
        value = rng.choice((0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(data)))
        width = rng.choice((2, 4))
        out[i:i + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, rng.choice(("little", "big")))
    elif kind == 3:
        del out[rng.randrange(1, len(out)):]
    elif kind == 4:
        i = rng.randrange(len(out))
        del out[i:i + rng.randint(1, 64)]
    elif kind == 5:
        i = rng.randrange(len(out))
        out[i:i] = out[i:i + rng.randint(1, 64)] * rng.randint(1, 4)
    else:
        i = rng.randrange(len(out) + 1)
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


class DecodeTimeout(Exception):
    pass


@dataclass
class FuzzReport:
    decodes: int = 0
    outcomes: Counter = field(default_factory=Counter)      # "ok" or the ImageError reason
    crashes: list = field(default_factory=list)             # (seed name, mutation, exception type, message)
    hangs: list = field(default_factory=list)               # (seed name, mutation, seconds)
    slowest: tuple = (0.0, "")                              # (seconds, seed name#mutation)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"decodes": self.decodes, "crashes": len(self.crashes), "hangs": len(self.hangs),
                "slowest_s": round(self.slowest[0], 4), "slowest": self.slowest[1], "seconds": round(self.seconds, 2),
                "outcomes": dict(self.outcomes.most_common())}


def fuzz(seeds: dict[str, bytes], mutations_per_seed: int, seed: int = 0, *, max_pixels: int = 1 << 20,
         formats=None, time_limit: float = 5.0) -> FuzzReport:
    """Decode `mutations_per_seed` mutations of each seed file (and the seed itself) with `formats`
    (None: every format PIL opens), each under `time_limit` seconds (SIGALRM, main thread only)."""
    formats = openable_formats() if formats is None else list(formats)
    report, started = FuzzReport(), time.perf_counter()

    def expire(signum, frame):
        raise DecodeTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        for name, original in sorted(seeds.items()):
            rng = random.Random(f"{seed}:{name}")
            for index in range(mutations_per_seed + 1):
                data = original if index == 0 else mutate(original, rng)
                begin = time.perf_counter()
                signal.setitimer(signal.ITIMER_REAL, time_limit)
                try:
                    decode_image(data, max_pixels, formats=formats)
                    report.outcomes["ok"] += 1
                except ImageError as err:
                    report.outcomes[err.reason] += 1
                except DecodeTimeout:
                    report.hangs.append((name, index, time_limit))
                except Exception as err:  # noqa: BLE001 - what escaped the opener is the finding
                    report.crashes.append((name, index, type(err).__name__, str(err)[:200]))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                spent = time.perf_counter() - begin
                report.decodes += 1
                if spent > report.slowest[0]:
                    report.slowest = (spent, f"{name}#{index}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.seconds = time.perf_counter() - started
    return report
