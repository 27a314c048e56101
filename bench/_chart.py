"""The ratio plot: matplotlib when the ``bench`` extra is installed, else a tiny PNG of our own.

The fallback writes an RGB PNG with zlib (no dependency): one bar per metric, height = median
ratio deliverd/Postfix, a grey line at 1.0, and a dot per round. No text (no font renderer);
the summary table and the JSON carry the numbers.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

Series = Mapping[str, Sequence[float]]  # metric label -> per-round ratios


def plot_ratios(series: Series, path: Path, title: str) -> str:
    """Write the plot; returns which renderer made it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, _bars(series))
        return "zlib"
    labels = list(series)
    medians = [_median(series[k]) for k in labels]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    ax.bar(range(len(labels)), medians, color="#4C72B0", label="median")
    for i, key in enumerate(labels):
        ax.scatter([i] * len(series[key]), series[key], color="black", s=12, zorder=3,
                   label="rounds" if i == 0 else None)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    ax.set_ylabel("deliverd / Postfix")
    ax.set_title(title, fontsize=10)
    for i, value in enumerate(medians):
        if not math.isnan(value):
            ax.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _median(values: Sequence[float]) -> float:
    finite = sorted(v for v in values if not math.isnan(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


Pixels = list[bytearray]


def _bars(series: Series, width: int = 480, height: int = 240) -> Pixels:
    rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    top = max([2.0, *(v for vs in series.values() for v in vs if not math.isnan(v))])

    def y_of(value: float) -> int:
        return height - 1 - int(min(value, top) / top * (height - 10))

    def fill(x0: int, x1: int, y0: int, y1: int, rgb: bytes) -> None:
        for y in range(max(0, y0), min(height, y1)):
            for x in range(max(0, x0), min(width, x1)):
                rows[y][3 * x:3 * x + 3] = rgb

    slot = width // max(1, len(series))
    for i, values in enumerate(series.values()):
        value = _median(values)
        if not math.isnan(value):
            fill(i * slot + slot // 5, (i + 1) * slot - slot // 5, y_of(value), height,
                 b"\x4c\x72\xb0")
        for v in values:
            if not math.isnan(v):
                centre = i * slot + slot // 2
                fill(centre - 2, centre + 3, y_of(v) - 2, y_of(v) + 3, b"\x00\x00\x00")
    fill(0, width, y_of(1.0), y_of(1.0) + 1, b"\x80\x80\x80")
    return rows


def _write_png(path: Path, rows: Pixels) -> None:
    height, width = len(rows), len(rows[0]) // 3

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
