"""Grouped nested CV evaluation. A method is fn(Xdict, tr, te) -> (len(te), n_rules) rule scores
(or (len(te),) risk). Thresholds are chosen on inner grouped-CV out-of-fold scores of the
training part only, then applied to the outer test fold."""
import numpy as np
from sklearn.metrics import roc_auc_score
from common import *

D = load_dev()
Y = np.array([d["y"] for d in D])
CAT = np.array([RULES.index(d["category"]) if d["y"] else -1 for d in D])
LANG = np.array([d["lang"] for d in D])
KIND = np.array([d["kind"] for d in D])
SRC = np.array([d["source"] for d in D])
SCARY = np.array([d["scary"] for d in D]).astype(bool)
FOLD = folds(D, 5, 0)
GROUP = np.array([d["group"] for d in D])
BOTH = ["xstest", "xstest-completions", "openai-moderation", "cold", "jade-db-v3"]


def risk_of(S):
    return S if S.ndim == 1 else S.max(1)


def thr_f1(y, s):
    o = np.argsort(-s); ys = y[o]; ss = s[o]
    tp = np.cumsum(ys); fp = np.cumsum(1 - ys); P = ys.sum()
    f1 = 2 * tp / (tp + fp + P)
    i = np.argmax(f1)
    return (ss[i] + ss[i + 1]) / 2 if i + 1 < len(ss) else ss[i] - 1e-6


def thr_recall(y, s, r):
    sp = np.sort(s[y == 1])[::-1]
    k = int(np.ceil(r * len(sp))) - 1
    return sp[k] - 1e-6


POLICIES = {"f1": thr_f1, "r85": lambda y, s: thr_recall(y, s, 0.85), "r82": lambda y, s: thr_recall(y, s, 0.82), "r80": lambda y, s: thr_recall(y, s, 0.80)}


def inner_folds(tr, n=5):
    g = GROUP[tr]
    ug = sorted(set(g))
    rng = np.random.RandomState(1); rng.shuffle(ug)
    m = {x: i % n for i, x in enumerate(ug)}
    return np.array([m[x] for x in g])


def run_cv(method, X, nested=True, per_lang=False):
    """Returns dict with 'S' (n, R) or (n,) outer-fold scores, 'thr': {policy: (n,) threshold per item}."""
    n = len(D)
    S = None
    thr = {p: np.zeros(n) for p in POLICIES}
    for f in range(5):
        tr = np.where(FOLD != f)[0]; te = np.where(FOLD == f)[0]
        st = method(X, tr, te)
        if S is None:
            S = np.zeros((n,) + st.shape[1:])
        S[te] = st
        if not nested:
            continue
        inf = inner_folds(tr)
        oof = np.zeros((len(tr),) + st.shape[1:])
        for g in range(5):
            a = tr[inf != g]; b = tr[inf == g]
            oof[inf == g] = method(X, a, b)
        ro = risk_of(oof)
        for p, fn in POLICIES.items():
            if per_lang:
                for L in ("en", "zh"):
                    mtr = LANG[tr] == L
                    thr[p][te[LANG[te] == L]] = fn(Y[tr][mtr], ro[mtr])
            else:
                thr[p][te] = fn(Y[tr], ro)
    return {"S": S, "thr": thr}


def auc(mask, r):
    y = Y[mask]
    if y.min() == y.max():
        return float("nan")
    return roc_auc_score(y, r[mask])


def prf(mask, pred):
    y = Y[mask]; p = pred[mask]
    tp = (y & p).sum(); fp = ((1 - y) & p).sum(); fn = (y & ~p).sum()
    P = tp / max(tp + fp, 1); R = tp / max(tp + fn, 1)
    return P, R, 2 * P * R / max(P + R, 1e-9)


def metrics(res, policy="f1"):
    r = risk_of(res["S"])
    allm = np.ones(len(D), bool)
    out = {"auc": auc(allm, r), "auc_en": auc(LANG == "en", r), "auc_zh": auc(LANG == "zh", r),
           "auc_prompt": auc(KIND == "prompt", r), "auc_resp": auc(KIND == "response", r)}
    for s in BOTH:
        out["auc_" + s] = auc(SRC == s, r)
    out["auc_srcmean"] = np.mean([out["auc_" + s] for s in BOTH])
    if policy and res["thr"][policy].any():
        pred = (r > res["thr"][policy]).astype(int).astype(bool)
        Yb = Y.astype(bool)
        P, R, F = prf(allm, pred.astype(int))
        out.update(P=P, R=R, F1=F, fpr_ok=pred[~Yb].mean(), fpr_scary=pred[SCARY].mean(),
                   F1_oai=prf(SRC == "openai-moderation", pred.astype(int))[2],
                   R_zh=pred[Yb & (LANG == "zh")].mean(), fpr_zh=pred[~Yb & (LANG == "zh")].mean())
    return out


def rule_aucs(S):
    """Per-rule AUC: category-c violations vs all ok items, using rule c's score."""
    out = {}
    for c, rname in enumerate(RULES):
        m = (CAT == c) | (Y == 0)
        y = (CAT[m] == c).astype(int)
        out[rname] = roc_auc_score(y, S[m, c])
    return out


def fmt_row(name, m, keys=("auc", "auc_en", "auc_zh", "auc_srcmean", "P", "R", "F1", "fpr_ok", "fpr_scary", "F1_oai")):
    return "| " + name + " | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys) + " |"


HEADER_KEYS = ("auc", "auc_en", "auc_zh", "auc_srcmean", "P", "R", "F1", "fpr_ok", "fpr_scary", "F1_oai")


def header():
    return "| method | " + " | ".join(HEADER_KEYS) + " |\n|" + "---|" * (len(HEADER_KEYS) + 1)
