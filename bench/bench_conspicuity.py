"""How visible each finding of the built-in dataset is at the training resolution.

For every finding: render the same anatomy and seed with and without it, downsample both to
the cache size (128 px by default), and take the L2 norm of the difference (grey levels),
the median over anatomies and views (laterals for Kyphosis). The grades in
`cxrlt.synth.findings.GRADES` set a target for this signal; `--gains G1,G2,...` measures
each finding at other gains, to recalibrate `CONSPICUITY`.

    python bench/bench_conspicuity.py [--n 8] [--size 128] [--gains 1,2,4] [--out table.csv]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from cxrlt.synth.findings import CONSPICUITY, FINDINGS, GRADE_SIGNAL, GRADES
from cxrlt.synth.render import sign_signal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="anatomies per finding")
    ap.add_argument("--size", type=int, default=128, help="training resolution (px)")
    ap.add_argument("--gains", help="comma-separated gains to measure instead of the table's")
    ap.add_argument("--out", help="write the table as CSV")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for name in FINDINGS:
        if name == "Normal":
            continue
        row = {"finding": name, "grade": GRADES[name], "target": GRADE_SIGNAL[GRADES[name]],
               "gain": CONSPICUITY[name]}  # fmt: skip
        gains = [float(g) for g in args.gains.split(",")] if args.gains else [CONSPICUITY[name]]
        saved = CONSPICUITY[name]
        for g in gains:
            CONSPICUITY[name] = g
            row["signal" if not args.gains else f"signal@{g:g}"] = round(sign_signal(name, args.n, args.size))
        CONSPICUITY[name] = saved
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    order = {"obvious": 0, "clear": 1, "moderate": 2, "subtle": 3}
    table = table.sort_values(["grade", "finding"], key=lambda s: s.map(order) if s.name == "grade" else s)
    print(table.to_markdown(index=False) if hasattr(table, "to_markdown") else table.to_string())
    if args.out:
        table.to_csv(args.out, index=False)
    print(f"{len(rows)} findings x {args.n} anatomies in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
