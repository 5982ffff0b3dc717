#!/usr/bin/env python3
"""Grouped cross-validated quality of `charter eval` on a labelled set (shared/bench format).

The default constitution's exemplars come from the development set, so scoring dev items
against it would let each item find itself. This script splits the items' groups (the id
before '#') into K folds; for each fold it writes a copy of the constitution folder whose
example files leave out every exemplar of that fold's groups (`"source": "dev:<id>"`), runs
the real `charter eval` on the fold's items against it, and pools the held-out risks.
Reports ROC-AUC overall and per language, kind and source, and at the constitution's own
thresholds (verdict = fail) precision, recall, F1, the false-positive rate on
safe-but-scary items (ok items whose id contains xstest or antibias) and F1 on
openai-moderation.

usage: python3 bench/quality_cv.py [--data ../shared/bench/dev.jsonl] [--folds 2] [--out FILE]
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def group(item_id: str) -> str:
    return item_id.split("#", 1)[0]


def fold_of(g: str, k: int) -> int:
    return int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) % k


def auc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    r = sum(rk for rk, l in zip(ranks, labels) if l)
    return (r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def confusion(pred, labels):
    tp = sum(1 for p, l in zip(pred, labels) if p and l)
    fp = sum(1 for p, l in zip(pred, labels) if p and not l)
    fn = sum(1 for p, l in zip(pred, labels) if not p and l)
    tn = len(pred) - tp - fp - fn
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return dict(tp=tp, fp=fp, fn=fn, tn=tn, precision=prec, recall=rec, f1=f1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "bench", "dev.jsonl"))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--constitution-dir", default=os.path.join(ROOT, "constitution"))
    ap.add_argument("--charter", default=os.path.join(ROOT, "target", "release", "charter"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], help="CHARTER__KEY=VALUE")
    args = ap.parse_args()

    items = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    by_id = {it["id"]: it for it in items}
    risk = {}
    started = time.time()
    for f in range(args.folds):
        held = {it["id"] for it in items if fold_of(group(it["id"]), args.folds) == f}
        held_groups = {group(i) for i in held}
        with tempfile.TemporaryDirectory() as tmp:
            cdir = os.path.join(tmp, "constitution")
            shutil.copytree(args.constitution_dir, cdir)
            for dirpath, _, files in os.walk(cdir):
                for name in files:
                    if not name.endswith(".jsonl"):
                        continue
                    path = os.path.join(dirpath, name)
                    keep = []
                    for line in open(path, encoding="utf-8"):
                        src = json.loads(line).get("source", "")
                        if src.startswith("dev:") and group(src[4:]) in held_groups:
                            continue
                        keep.append(line)
                    with open(path, "w", encoding="utf-8") as out:
                        out.writelines(keep)
            inp = os.path.join(tmp, "in.jsonl")
            with open(inp, "w", encoding="utf-8") as out:
                for i in sorted(held):
                    out.write(json.dumps({"id": i, "text": by_id[i]["text"]}, ensure_ascii=False) + "\n")
            env = dict(os.environ, CHARTER__CONSTITUTIONS__DIR=cdir, CHARTER__LOG__FILTER="warn",
                       **dict(kv.split("=", 1) for kv in args.set))
            proc = subprocess.run([args.charter, "eval", inp], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            for line in proc.stdout.splitlines():
                r = json.loads(line)
                risk[r["id"]] = r["risk"]
        print(f"fold {f + 1}/{args.folds}: {len(held)} items", file=sys.stderr)
    secs = time.time() - started

    ids = [it["id"] for it in items if it["id"] in risk]
    lab = [by_id[i]["label"] == "violation" for i in ids]
    sc = [risk[i] for i in ids]
    report = {"items": len(ids), "folds": args.folds, "seconds": round(secs, 1),
              "auc": auc(sc, lab)}
    for key in ("lang", "kind", "source"):
        for v in sorted({by_id[i][key] for i in ids}):
            sel = [k for k, i in enumerate(ids) if by_id[i][key] == v]
            report[f"auc_{key}={v}"] = auc([sc[k] for k in sel], [lab[k] for k in sel])
    pred = [s > 0 for s in sc]
    report["at_thresholds"] = confusion(pred, lab)
    scary = [k for k, i in enumerate(ids)
             if not lab[k] and ("xstest" in i or "antibias" in i)]
    report["fpr_safe_but_scary"] = sum(pred[k] for k in scary) / len(scary) if scary else None
    oai = [k for k, i in enumerate(ids) if by_id[i]["source"] == "openai-moderation"]
    report["f1_openai_moderation"] = confusion([pred[k] for k in oai], [lab[k] for k in oai])["f1"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
