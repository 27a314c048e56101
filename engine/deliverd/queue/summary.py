"""The shape of the queue, as Postfix's qshape shows it: recipients by destination domain and
by the age of their message, the busiest domains first.

Pure: ``summarise`` takes the (domain, age bucket, count) rows the database counted and makes
the table; ``format_summary`` and ``summary_json`` render it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# qshape's default buckets, in minutes: each column holds messages younger than its bound
# (and not younger than the previous one); the last column the older ones.
AGE_BOUNDS_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True)
class Row:
    domain: str
    total: int
    ages: tuple[int, ...]  # one count per bucket, len(bounds) + 1


@dataclass(frozen=True)
class Summary:
    bounds_minutes: tuple[int, ...]
    total: Row
    top: tuple[Row, ...]
    others: Row | None  # every domain past the top N, added up
    domains: int  # distinct destination domains


def summarise(
    counts: Iterable[tuple[str, int, int]],
    *,
    top: int,
    bounds_minutes: tuple[int, ...] = AGE_BOUNDS_MINUTES,
) -> Summary:
    """``counts``: (domain, bucket index, recipients). ``top`` domains by recipients (ties by
    name); ``top <= 0`` keeps every domain."""
    width = len(bounds_minutes) + 1
    per_domain: dict[str, list[int]] = {}
    for domain, bucket, n in counts:
        per_domain.setdefault(domain, [0] * width)[min(bucket, width - 1)] += n
    rows = sorted((Row(d, sum(a), tuple(a)) for d, a in per_domain.items()),
                  key=lambda r: (-r.total, r.domain))
    shown = rows if top <= 0 else rows[:top]
    rest = rows[len(shown):]
    return Summary(
        bounds_minutes=bounds_minutes,
        total=_add("TOTAL", rows, width),
        top=tuple(shown),
        others=_add(f"({len(rest)} more)", rest, width) if rest else None,
        domains=len(rows),
    )


def _add(label: str, rows: list[Row], width: int) -> Row:
    ages = tuple(sum(r.ages[i] for r in rows) for i in range(width))
    return Row(label, sum(ages), ages)


def _headings(bounds: tuple[int, ...]) -> list[str]:
    return [str(b) for b in bounds] + [f"{bounds[-1]}+"]


def format_summary(summary: Summary) -> str:
    """qshape's layout: a column per age bucket (minutes), TOTAL first."""
    rows = [summary.total, *summary.top]
    if summary.others is not None:
        rows.append(summary.others)
    name_width = max(12, *(len(r.domain) for r in rows))
    cells = ["T", *_headings(summary.bounds_minutes)]
    widths = [max(5, len(c), *(len(str(v)) for r in rows for v in (r.total, *r.ages)))
              for c in cells]
    lines = [" " * name_width + " " + " ".join(c.rjust(w) for c, w in zip(cells, widths,
                                                                          strict=True))]
    for r in rows:
        values = [r.total, *r.ages]
        lines.append(r.domain.rjust(name_width) + " "
                     + " ".join(str(v).rjust(w) for v, w in zip(values, widths, strict=True)))
    return "\n".join(lines) + "\n"


def summary_json(summary: Summary) -> dict[str, object]:
    def row(r: Row) -> dict[str, object]:
        return {"domain": r.domain, "total": r.total, "ages": list(r.ages)}

    return {
        "age_buckets_minutes": _headings(summary.bounds_minutes),
        "total": {"total": summary.total.total, "ages": list(summary.total.ages)},
        "domains": [row(r) for r in summary.top],
        "other_domains": (None if summary.others is None else
                          {"count": summary.domains - len(summary.top),
                           "total": summary.others.total, "ages": list(summary.others.ages)}),
    }
