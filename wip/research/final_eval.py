"""Q2-Q4/Q6: full grouped nested-CV evaluation of the candidate methods, with per-language / kind / source
breakdown and several threshold policies. Writes results_final.json and prints markdown tables.
Usage: python final_eval.py [seed]   (seed changes the outer/inner group-to-fold assignment)"""
import json, sys
import numpy as np
import evallib
from evallib import *
from methods import knn
from head import Head

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if seed:
    evallib.FOLD[:] = folds(D, 5, seed)
Xd = {m: np.load(f"{CACHE}/{m}_whole.npy").astype(np.float64) for m in ("use", "e5")}


def head(models, **kw):
    def fn(X, tr, te):
        h = Head(models, **kw).fit({m: X[m][tr] for m in models}, CAT[tr], GROUP[tr], scary=SCARY[tr])
        return h.score({m: X[m][te] for m in models})
    return fn


def avg(*fns):
    return lambda X, tr, te: np.mean([f(X, tr, te) for f in fns], 0)


def on(m, fn):
    return lambda X, tr, te: fn(X[m], tr, te)


CAND = {
    "A pyref kNN k=5 (40 viol/rule, 150 comp), USE": on("use", knn(5, viol_max=40, comp_max=150)),
    "B kNN k=10 all exemplars, USE": on("use", knn(10)),
    "B' kNN k=10 all exemplars, centred, e5": on("e5", knn(10, ctr=True)),
    "C head USE": head(["use"]),
    "C3 head USE, contrastive w=3": head(["use"], scary_w=3.0),
    "D head e5": head(["e5"]),
    "D3 head e5, contrastive w=3": head(["e5"], scary_w=3.0),
    "E head USE+e5 (concat)": head(["use", "e5"]),
    "E3 head USE+e5 (concat), contrastive w=3": head(["use", "e5"], scary_w=3.0),
    "F mean(head USE, head e5)": avg(head(["use"]), head(["e5"])),
}
which = sys.argv[2].split(",") if len(sys.argv) > 2 else None
allres = {}
for name, fn in CAND.items():
    if which and not any(name.startswith(w + " ") for w in which):
        continue
    res = run_cv(fn, Xd)
    resL = {"S": res["S"], "thr": run_cv(fn, Xd, per_lang=True)["thr"]} if name[0] in "CDEF" else None
    np.save(f"{CACHE}/final_s{seed}_{name.split()[0]}.npy", res["S"])
    r = {p: metrics(res, p) for p in POLICIES}
    if resL:
        r.update({p + "_lang": metrics(resL, p) for p in POLICIES})
    if res["S"].ndim == 2:
        r["rule_auc"] = rule_aucs(res["S"])
    allres[name] = r
    m = r["r85"]
    print(f"{name}: AUC {m['auc']:.3f} en {m['auc_en']:.3f} zh {m['auc_zh']:.3f} | r85: R {m['R']:.3f} FPRscary {m['fpr_scary']:.3f} F1oai {m['F1_oai']:.3f}", flush=True)
suffix = ("_" + sys.argv[2].replace(",", "")) if len(sys.argv) > 2 else ""
json.dump(allres, open(f"results_final_s{seed}{suffix}.json", "w"), indent=1, default=float)
