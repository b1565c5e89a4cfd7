#!/usr/bin/env python3
"""Summarises a CubeCL debug log (`CUBECL_DEBUG_LOG=FILE CUBECL_DEBUG_OPTION=profile-medium`): the GPU time
of each kernel (total, count, mean), the largest first, and every matrix product autotune chose, with the
problem (m, n, k) and each candidate's measured time. Used by bench/device.sh on the GPU machine.

    bench/cubecl_profile.py LOG [--top N]
"""

import argparse
import collections
import re
import sys

UNITS = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
KERNEL = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")
SUFFIX = re.compile(r"_[0-9a-f]{8}$")


def short(name):
    """The kernel's name without its hash, long generic chains cut to their first and last parts."""
    name = SUFFIX.sub("", name)
    parts = [p.strip() for p in name.split("|")]
    if len(parts) > 4:
        parts = parts[:2] + ["…"] + parts[-2:]
    return " | ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    totals = collections.defaultdict(lambda: [0.0, 0])
    tuned = []
    try:
        lines = open(args.log, encoding="utf-8", errors="replace")
    except OSError as e:
        print(f"error: cannot read {args.log}: {e}", file=sys.stderr)
        return 1
    with lines:
        for line in lines:
            m = KERNEL.match(line)
            if m:
                us = float(m.group(1)) * UNITS[m.group(2)]
                entry = totals[short(m.group(3))]
                entry[0] += us
                entry[1] += 1
            elif line.startswith("Fastest result"):
                problem = re.search(r"m: (\d+), n: (\d+), k: (\d+)", line)
                kernel = line.split()[2].split("-")[0]
                tuned.append((problem.groups() if problem else ("?", "?", "?"), kernel, []))
            elif line.startswith("Autotune[") and tuned:
                c = re.search(r"name (\S+) => .*?median: ([0-9.]+)(ns|µs|us|ms|s)", line)
                if c:
                    tuned[-1][2].append((c.group(1), float(c.group(2)) * UNITS[c.group(3)]))

    all_us = sum(t for t, _ in totals.values())
    print(f"kernels: {sum(n for _, n in totals.values())} launches, {all_us / 1e3:.1f} ms of GPU time")
    print(f"{'total ms':>10} {'share':>6} {'count':>7} {'mean µs':>9}  kernel")
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us / 1e3:10.2f} {us / all_us * 100 if all_us else 0:5.1f}% {n:7d} {us / n:9.1f}  {name}")
    print("\nmatrix products autotuned (m, n, k: chosen; candidates' median µs):")
    for (m, n, k), kernel, candidates in tuned:
        if m == "?":  # reductions and fused kernels: their problem is not an (m, n, k)
            continue
        shown = ", ".join(f"{c} {us:.0f}" for c, us in sorted(candidates, key=lambda c: c[1])[:6])
        print(f"  m {m}, n {n}, k {k}: {kernel}; {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
