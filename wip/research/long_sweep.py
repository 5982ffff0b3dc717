"""Q5 trade-off: flag if max(whole, pmax - delta) > t, where t is the whole-text threshold chosen on inner
folds (policy r85) and delta is a fixed offset that pieces must clear in addition.
Reports dev metrics and synthetic buried-violation recall / ok FPR for a sweep of delta.
Pieces are only used for texts longer than GATE tokens (default 128); shorter texts use the whole score.
Also reports whether each preamble alone (a 2,000-word benign document) gets flagged (fraction of 5 folds x 2 languages).
Usage: python long_sweep.py MODELS PIECE [GATE]"""
import json, sys
import numpy as np
from evallib import *
from head import Head

models = sys.argv[1].split("+"); piece = sys.argv[2]; GATE = int(sys.argv[3]) if len(sys.argv) > 3 else 128
PIECEHEAD = len(sys.argv) > 4 and sys.argv[4] == "piecehead"   # pieces scored by a 2nd head that also has
# the pieces of training ok texts (+ background pieces) as compliant exemplars
DELTAS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
items = json.load(open(f"{HERE}/synth/items.json"))
base = np.array([it["base"] for it in items]); pos = np.array([it["pos"] for it in items])
sy = np.array([it["y"] for it in items])
Xd = {m: np.load(f"{CACHE}/{m}_whole.npy").astype(np.float64) for m in models}
SXd = {m: np.load(f"{CACHE}/synth_{m}_whole.npy").astype(np.float64) for m in models}
DP = {m: np.load(f"{CACHE}/{m}_{piece}.npy").astype(np.float64) for m in models}
DPo = np.load(f"{CACHE}/{models[0]}_{piece}_owner.npy")
SP = {m: np.load(f"{CACHE}/synth_{m}_{piece}.npy").astype(np.float64) for m in models}
SPo = np.load(f"{CACHE}/synth_{models[0]}_{piece}_owner.npy")
PW = {m: np.load(f"{CACHE}/pre_{m}_whole.npy").astype(np.float64) for m in models}
PP = {m: np.load(f"{CACHE}/pre_{m}_{piece}.npy").astype(np.float64) for m in models}
PPo = np.load(f"{CACHE}/pre_{models[0]}_{piece}_owner.npy")
NTOK = np.load(f"{CACHE}/use_ntok.npy")
NP = np.bincount(DPo, minlength=len(D))
try:
    BG = {m: np.load(f"{CACHE}/bg_{m}_{piece}.npy").astype(np.float64) for m in models}
except FileNotFoundError:
    BG = None
ALPHAS = [0.02, 0.01, 0.005]
CALD = {al: [] for al in ALPHAS}


def fit_piecehead(tr):
    k = np.isin(DPo, tr[Y[tr] == 0]) & (NP[DPo] > 1)
    ex = {m: DP[m][k] for m in models}; eg = GROUP[DPo[k]]
    if BG:
        ex = {m: np.vstack([ex[m], BG[m]]) for m in models}; eg = np.concatenate([eg, ["__bg__"] * len(BG[models[0]])])
    return Head(models).fit({m: Xd[m][tr] for m in models}, CAT[tr], GROUP[tr], extra=ex, extra_groups=eg)


def ws(h, W, P, own, sel):
    if isinstance(h, tuple):
        h, hp = h
    else:
        hp = h
    Sw = h.score({m: W[m][sel] for m in models}).max(1)
    remap = -np.ones(max(own.max() + 1, W[models[0]].shape[0]), int); remap[sel] = np.arange(len(sel))
    k = remap[own] >= 0
    Sp = hp.score({m: P[m][k] for m in models}).max(1)
    pm = np.full(len(sel), -np.inf); np.maximum.at(pm, remap[own[k]], Sp)
    return Sw, pm


n = len(D)
dW, dP, dT = np.zeros(n), np.zeros(n), np.zeros(n)
sW, sP, sT = np.zeros(len(items)), np.zeros(len(items)), np.zeros(len(items))
pW, pP, pT = [], [], []
dF, sF = np.zeros(n, int), np.zeros(len(items), int)
for f in range(5):
    tr = np.where(FOLD != f)[0]; te = np.where(FOLD == f)[0]
    h = Head(models).fit({m: Xd[m][tr] for m in models}, CAT[tr], GROUP[tr])
    inf = inner_folds(tr); oof = np.zeros(len(tr)); okp = []
    for g in range(5):
        a, b = tr[inf != g], tr[inf == g]
        hi = Head(models).fit({m: Xd[m][a] for m in models}, CAT[a], GROUP[a])
        oof[inf == g] = hi.score({m: Xd[m][b] for m in models}).max(1)
        # benign pieces: pieces of held-out ok texts that were split into >1 piece
        k = np.isin(DPo, b[Y[b] == 0]) & (NP[DPo] > 1)
        hpi = fit_piecehead(a) if PIECEHEAD else hi
        okp.append(hpi.score({m: DP[m][k] for m in models}).max(1))
    if PIECEHEAD:
        h = (h, fit_piecehead(tr))
    okp = np.concatenate(okp + ([(h[1] if PIECEHEAD else h).score(BG).max(1)] if BG else []))
    t = POLICIES["r85"](Y[tr], oof)
    for al in ALPHAS:
        CALD[al].append(np.quantile(okp, 1 - al) - t)
    dW[te], dP[te] = ws(h, Xd, DP, DPo, te); dT[te] = t; dF[te] = f
    sel = np.where(np.isin(base, te))[0]
    sW[sel], sP[sel] = ws(h, SXd, SP, SPo, sel); sT[sel] = t; sF[sel] = f
    a, b = ws(h, PW, PP, PPo, np.arange(2)); pW += list(a); pP += list(b); pT += [t, t]
pW, pP, pT = map(np.array, (pW, pP, pT))
dP[NTOK <= GATE] = -np.inf
print(f"## {'+'.join(models)} pieces={piece}{' (piece head)' if PIECEHEAD else ''}, gate >{GATE} tokens: flag if max(whole, pmax - delta) > t_whole")
print("| delta | dev AUC | dev R | dev FPR ok | dev FPR scary | synth viol prepend | synth viol append | synth ok FPR prepend | synth ok FPR append | preamble alone flagged |")
print("|---|---|---|---|---|---|---|---|---|---|")
V, O, pr, ap = sy == 1, sy == 0, pos == "prepend", pos == "append"
out = {}
pF = np.repeat(np.arange(5), 2)
for d in DELTAS + [np.inf] + [f"cal{al}" for al in ALPHAS]:
    dd, sd, pd = (d, d, d) if not isinstance(d, str) else tuple(np.array(CALD[float(d[3:])])[F] for F in (dF, sF, pF))
    r = np.maximum(dW, dP - dd); fl = r > dT
    rs = np.maximum(sW, sP - sd); fs = rs > sT
    row = [auc(np.ones(n, bool), r), fl[Y == 1].mean(), fl[Y == 0].mean(), fl[SCARY].mean(),
           fs[V & pr].mean(), fs[V & ap].mean(), fs[O & pr].mean(), fs[O & ap].mean(), (np.maximum(pW, pP - pd) > pT).mean()]
    out[str(d)] = row
    if isinstance(d, str):
        d = f"{d} (delta {np.mean(CALD[float(d[3:])]):.2f})"
    print(f"| {d} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
json.dump(out, open(f"results_longsweep_{'+'.join(models)}_{piece}_g{GATE}{'_ph' if PIECEHEAD else ''}.json", "w"), indent=1)
