"""One row of the paper-vs-code report, and the plain-text table the CLI prints.

A row pairs a figure the paper prints (with the table or section it stands in) with the same
quantity computed here from a config and a formula. Rows whose `paper` is None are ours only:
context the paper does not print (a 64K-token cache, the 7168-wide EP step, ...).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    id: str  # "<quantity>.<subject>", e.g. "kv_bytes_per_token.deepseek_v3"
    paper: float | None  # as printed; None where the paper gives no figure
    ours: float
    unit: str
    source: str  # where the paper's figure stands, or what ours is when there is none

    @property
    def rel_diff(self) -> float | None:
        """(ours - paper) / paper."""
        if self.paper is None or self.paper == 0:
            return None
        return (self.ours - self.paper) / self.paper

    def as_json(self) -> dict:
        return {"id": self.id, "paper": self.paper, "ours": self.ours, "unit": self.unit,
                "source": self.source}


def fmt(x: float | None) -> str:
    """70272 -> '70,272'; 14.75712 -> '14.757'; None -> '-'."""
    if x is None:
        return "-"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1e5:
        return f"{x:,.0f}"
    return f"{x:,.5g}"


def format_table(sections: list[tuple[str, list[Row]]]) -> str:
    """Sections of rows -> aligned text: id, paper, ours, unit, relative difference, source."""
    lines = []
    for title, rows in sections:
        width = max(len(r.id) for r in rows)
        lines += ["", f"## {title}",
                  f"{'id':<{width}}  {'paper':>12}  {'ours':>12}  {'unit':<8} {'diff':>8}  source"]
        for r in rows:
            diff = "" if r.rel_diff is None else f"{r.rel_diff:+.2%}"
            lines.append(f"{r.id:<{width}}  {fmt(r.paper):>12}  {fmt(r.ours):>12}  {r.unit:<8} "
                         f"{diff:>8}  {r.source}")
    return "\n".join(lines[1:])
