"""Pure arithmetic of the benchmarks: percentiles, medians, ratios, the summary table."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

# Both MTAs log one line per delivered recipient with a Postfix-style ``delay=`` (seconds from
# arrival in the queue to the remote 250, 10 ms resolution) and ``status=sent``.
_SENT = re.compile(r"\bdelay=([0-9.]+)\b.*\bstatus=sent\b")


def sent_delays(log_text: str) -> list[float]:
    return [float(m.group(1)) for m in _SENT.finditer(log_text)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table; ``columns`` are (key, heading) pairs, floats get 2 decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    grid = [[heading for _, heading in columns]]
    grid += [[cell(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(widths[i]) for i, text in enumerate(line)) for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
