"""`python -m dsv3_jax.analysis [--json] [--plots DIR]`: the paper's numbers against ours.

Prints one table per topic (id, paper, ours, unit, relative difference, source); `--json`
prints {"rows": [{"id", "paper", "ours", "unit", "source"}, ...]} instead; `--plots DIR` also
writes kv_cache.png and tpot.png there.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv3_jax.analysis import ep_bound, fp8, kv_cache, logfmt, moe_economics, network, plots, train_flops
from dsv3_jax.analysis.report import Row, format_table

SECTIONS = (
    ("KV cache per token (P1 §2.1.2, Table 1)", kv_cache.rows),
    ("Training compute per token (P1 §2.2.1, Table 2)", train_flops.rows),
    ("EP bound on decode (P1 §2.3.2)", ep_bound.rows),
    ("MoE parameters and local decode (P1 §2.2)", moe_economics.rows),
    ("Network topologies, 64-port switches (P1 §5.1, Table 3)", network.rows),
    ("FP8 accumulation, K = 4096 (P1 §3.1; V3 report §3.3.2)", fp8.rows),
    ("Combine wire formats (P1 §3.2)", logfmt.rows),
)


def sections() -> list[tuple[str, list[Row]]]:
    return [(title, make()) for title, make in SECTIONS]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--plots", metavar="DIR", help="write kv_cache.png and tpot.png to DIR")
    args = ap.parse_args(argv)
    secs = sections()
    if args.json:
        print(json.dumps({"rows": [r.as_json() for _, rows in secs for r in rows]}, indent=1))
    else:
        print(format_table(secs))
    if args.plots:
        for path in plots.write(args.plots):  # to stderr under --json: stdout stays one document
            print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
