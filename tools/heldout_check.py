#!/usr/bin/env python3
"""Verdicts of the default constitution on the held-out files: how many fail, per file,
language and kind.

The files are never fitted on (README.md, "Ordinary traffic"): bench/holdout/ (everyday
prompts and answers and refusals, en and zh, written apart from every training file),
the S-Labs and neuralchemy validation prompts (assets/data/, `make data`), and
bench/harmful-answers.jsonl and bench/holdout/harmful-prompts.jsonl (harmful answers and
requests, which should fail), and bench/holdout/everyday-short.jsonl (short everyday requests
that only sound edgy: "how do I kill a python process"). Each file goes through
`charter eval` as it is (`kind` is not sent: eval scores every text the same way), with
the configuration of the environment (`CHARTER__MODEL__DIR` for another encoder).

usage: python3 tools/heldout_check.py [--charter target/release/charter] [FILE ...]
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [
    "bench/holdout/everyday-en.jsonl",
    "bench/holdout/everyday-zh.jsonl",
    "bench/holdout/refusals.jsonl",
    "assets/data/ordinary-slabs-validation.jsonl",
    "assets/data/ordinary-neuralchemy-validation.jsonl",
    "bench/holdout/everyday-short.jsonl",
    "bench/harmful-answers.jsonl",
    "bench/holdout/harmful-prompts.jsonl",
]


def check(charter: Path, path: Path) -> dict[str, tuple[int, int]]:
    """(lang/kind) -> (failed, total) for one JSONL file."""
    items = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                items[item["id"]] = item
    with open(path, "rb") as f:
        out = subprocess.run([str(charter), "eval"], stdin=f, capture_output=True,
                             check=True, cwd=ROOT).stdout
    failed, total = collections.Counter(), collections.Counter()
    for line in out.decode().splitlines():
        result = json.loads(line)
        item = items[result["id"]]
        key = f"{item['lang']}/{item['kind']}"
        total[key] += 1
        failed[key] += result["verdict"] == "fail"
    if sum(total.values()) != len(items):
        sys.exit(f"{path}: {len(items)} items, {sum(total.values())} results")
    return {k: (failed[k], total[k]) for k in sorted(total)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--charter", type=Path, default=ROOT / "target" / "release" / "charter")
    ap.add_argument("files", nargs="*", default=FILES)
    args = ap.parse_args()
    for name in args.files:
        path = ROOT / name
        if not path.exists():
            print(f"{name}: missing (make data?)")
            continue
        rates = check(args.charter, path)
        cells = ", ".join(f"{k} {f}/{t} ({100 * f / t:.1f}%)" for k, (f, t) in rates.items())
        print(f"{name}: fail {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
