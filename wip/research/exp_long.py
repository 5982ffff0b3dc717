"""Q5 on dev: whole-text vs max over pieces (token windows / sentences) vs combinations.
Head is trained on whole-text exemplars; pieces are only queries.
Usage: python exp_long.py MODEL PIECES   e.g. use win128 | e5 sent | use+e5 win128"""
import sys
import numpy as np
from evallib import *
from head import Head

models = sys.argv[1].split("+"); piece = sys.argv[2]
Xd = {m: np.load(f"{CACHE}/{m}_whole.npy").astype(np.float64) for m in models}
Pd = {m: np.load(f"{CACHE}/{m}_{piece}.npy").astype(np.float64) for m in models}
owner = np.load(f"{CACHE}/{models[0]}_{piece}_owner.npy")
for m in models[1:]:
    assert (np.load(f"{CACHE}/{m}_{piece}_owner.npy") == owner).all()

STRATS = ["whole", "pmax", "max(whole,pmax)", "whole+0.5*relu(pmax-whole)", "mean(whole,pmax)"]


def agg(Sw, Sp, own, items):
    """Sw: (len(items),7) whole scores; Sp: piece scores for pieces whose owner in items."""
    pos = {it: i for i, it in enumerate(items)}
    pm = np.full_like(Sw, -np.inf)
    for j, o in enumerate(own):
        i = pos[o]; pm[i] = np.maximum(pm[i], Sp[j])
    return {"whole": Sw, "pmax": pm, "max(whole,pmax)": np.maximum(Sw, pm),
            "whole+0.5*relu(pmax-whole)": Sw + 0.5 * np.maximum(pm - Sw, 0),
            "mean(whole,pmax)": (Sw + pm) / 2}


def fit_score(tr, te):
    h = Head(models).fit({m: Xd[m][tr] for m in models}, CAT[tr], GROUP[tr])
    sel = np.isin(owner, te)
    Sw = h.score({m: Xd[m][te] for m in models})
    Sp = h.score({m: Pd[m][sel] for m in models})
    return agg(Sw, Sp, owner[sel], te)


if __name__ == "__main__":
    n = len(D)
    S = {s: np.zeros((n, 7)) for s in STRATS}
    thr = {s: {p: np.zeros(n) for p in POLICIES} for s in STRATS}
    for f in range(5):
        tr = np.where(FOLD != f)[0]; te = np.where(FOLD == f)[0]
        out = fit_score(tr, te)
        inf = inner_folds(tr)
        oof = {s: np.zeros((len(tr), 7)) for s in STRATS}
        for g in range(5):
            o = fit_score(tr[inf != g], tr[inf == g])
            for s in STRATS:
                oof[s][inf == g] = o[s]
        for s in STRATS:
            S[s][te] = out[s]
            for p, fn in POLICIES.items():
                thr[s][p][te] = fn(Y[tr], oof[s][tr * 0 + np.arange(len(tr))].max(1))
    ntok = np.load(f"{CACHE}/use_ntok.npy")
    print(f"## {'+'.join(models)} pieces={piece}")
    print(header() + " auc(>128tok) | auc(>256tok) |")
    for s in STRATS:
        res = {"S": S[s], "thr": thr[s]}
        m = metrics(res, "r85")
        r = S[s].max(1)
        print(fmt_row(s, m) + f" {auc(ntok > 128, r):.3f} | {auc(ntok > 256, r):.3f} |")
        np.save(f"{CACHE}/long_{'+'.join(models)}_{piece}_{s.replace('*','x').replace('(','_').replace(')','_').replace(',','_')}.npy", S[s])
