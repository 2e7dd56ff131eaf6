"""Print the exploration records (results.jsonl written by run.py) as a markdown table.

    python python/efficacy/table.py [--log FILE] [--tag-prefix P]

Columns: tag, bits, the settings changed, per arm the validation best (the selection
criterion) and the test score of the checkpoint picked on validation, the paired test
deltas, and the balance ratios of A and B (last interval of training).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def rows(records):
    out = ["| tag | bits | changed | val best (per arm) | test (per arm) | paired test deltas | ratio A / B |",
           "|---|---|---|---|---|---|---|"]
    for r in records:
        changed = {**r.get("cfg", {}), **r.get("recipe", {}), **r.get("spec", {}), **r.get("data", {})}
        arms = r["arms"]
        val = ", ".join(f"{a} {_fmt(_mean(v['val']))}" for a, v in arms.items())
        test = ", ".join(f"{a} {_fmt(_mean(v['test']))}" for a, v in arms.items())
        deltas = ", ".join(f"{k} {_fmt(v['mean'], '+.2f')}" for k, v in r.get("paired", {}).items())
        prem = r.get("premise", {})
        ratios = " / ".join(_fmt(prem.get(a, {}).get("ratio"), ".2f") for a in ("A", "B"))
        changed_s = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        out.append(f"| {r['tag']} | {r['bits']} | {changed_s} | {val} | {test} | {deltas} | {ratios} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default=str(HERE / "results.jsonl"))
    p.add_argument("--tag-prefix", default="")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in open(args.log) if line.strip()]
    print(rows([r for r in records if r["tag"].startswith(args.tag_prefix)]))


if __name__ == "__main__":
    main()
