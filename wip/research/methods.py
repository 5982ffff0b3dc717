"""Scoring methods. Each: fn(X, tr, te, **kw) -> (len(te), 7) rule scores or (len(te),) risk."""
import numpy as np
from sklearn.linear_model import LogisticRegression
from evallib import Y, CAT, SCARY, GROUP, LANG, D
from common import RULES

R = len(RULES)


def norm(A):
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def center(X, tr):
    mu = X[tr].mean(0)
    return norm(X - mu)


def topk_mean(S, k):
    k = min(k, S.shape[1])
    if k == 0:
        return np.zeros(S.shape[0])
    return np.partition(S, -k, axis=1)[:, -k:].mean(1)


def lse(S, T):
    m = S.max(1, keepdims=True)
    return (m[:, 0] + T * np.log(np.exp((S - m) / T).mean(1)))


def principle(P):
    def fn(X, tr, te):
        return X[te] @ P.T
    return fn


def exemplar_sets(tr, viol_max=None, comp_max=None, comp_mode="all", seed=0):
    rng = np.random.RandomState(seed)
    V = []
    for c in range(R):
        v = tr[CAT[tr] == c]
        if viol_max and len(v) > viol_max:
            v = rng.choice(v, viol_max, replace=False)
        V.append(v)
    comp = tr[Y[tr] == 0]
    if comp_mode == "noscary":
        comp = comp[~SCARY[comp]]
    if comp_max and len(comp) > comp_max:
        comp = rng.choice(comp, comp_max, replace=False)
    return V, comp


def knn_scores(Xq, Xe, V, comp, k=5, kc=None, agg="topk", T=0.05, mask=None):
    """mask: optional (len(q), n_all) boolean of exemplars to exclude (same group)."""
    kc = kc or k
    S = Xq @ Xe.T
    if mask is not None:
        S = np.where(mask, -1.0, S)
    f = (lambda A, kk: topk_mean(A, kk)) if agg == "topk" else (lambda A, kk: lse(np.partition(A, -kk, axis=1)[:, -kk:] if kk < A.shape[1] else A, T))
    cs = f(S[:, comp], kc)
    return np.stack([f(S[:, v], k) - cs for v in V], 1)


def knn(k=5, kc=None, viol_max=None, comp_max=None, comp_mode="all", agg="topk", T=0.05, ctr=False, seed=0):
    def fn(X, tr, te):
        Xc = center(X, tr) if ctr else X
        V, comp = exemplar_sets(tr, viol_max, comp_max, comp_mode, seed)
        return knn_scores(Xc[te], Xc, V, comp, k, kc, agg, T)
    return fn


def knn_vote(k=10, T=0.05):
    """Similarity-weighted vote among the k nearest of all exemplars: rule score = weight share of rule c."""
    def fn(X, tr, te):
        S = X[te] @ X[tr].T
        idx = np.argpartition(-S, k, axis=1)[:, :k]
        s = np.take_along_axis(S, idx, 1)
        w = np.exp((s - s.max(1, keepdims=True)) / T)
        c = CAT[tr][idx]
        out = np.zeros((len(te), R))
        for r in range(R):
            out[:, r] = (w * (c == r)).sum(1) / w.sum(1)
        return out
    return fn


def _lr(C, cw):
    return LogisticRegression(C=C, class_weight=cw, max_iter=2000)


def lr_rules(C=1.0, balanced=True, neg="all", scary_w=1.0, ctr=False, out="logit", feats=None):
    """One-vs-rest per rule. neg='all': negatives = ok + other-category violations; 'ok': only ok items."""
    def fn(X, tr, te):
        Xc = center(X, tr) if ctr else X
        Ftr, Fte = (Xc[tr], Xc[te]) if feats is None else feats(Xc, tr, te)
        res = np.zeros((len(te), R))
        for c in range(R):
            m = np.ones(len(tr), bool) if neg == "all" else ((CAT[tr] == c) | (Y[tr] == 0))
            y = (CAT[tr][m] == c).astype(int)
            w = np.where(SCARY[tr][m], scary_w, 1.0)
            clf = _lr(C, "balanced" if balanced else None).fit(Ftr[m], y, sample_weight=w)
            res[:, c] = clf.decision_function(Fte) if out == "logit" else clf.predict_proba(Fte)[:, 1]
        return res
    return fn


def lr_overall(C=1.0, balanced=True, scary_w=1.0, ctr=False, feats=None):
    def fn(X, tr, te):
        Xc = center(X, tr) if ctr else X
        Ftr, Fte = (Xc[tr], Xc[te]) if feats is None else feats(Xc, tr, te)
        w = np.where(SCARY[tr], scary_w, 1.0)
        clf = _lr(C, "balanced" if balanced else None).fit(Ftr, Y[tr], sample_weight=w)
        return clf.decision_function(Fte)
    return fn


def knn_feats(k=5):
    """Feature builder: [embedding, 7 kNN rule scores]; for training rows the kNN scores exclude
    exemplars of the row's own group (leave-group-out), so they are not self-matches."""
    def feats(X, tr, te):
        V, comp = exemplar_sets(tr)
        # knn_scores indexes exemplar columns by absolute item index
        mask_full = GROUP[tr][:, None] == GROUP[None, :]
        ktr = knn_scores(X[tr], X, V, comp, k, mask=mask_full)
        kte = knn_scores(X[te], X, V, comp, k)
        return np.hstack([X[tr], ktr]), np.hstack([X[te], kte])
    return feats


def knn_std(k=10, ctr=False, mode="z"):
    """kNN rule scores standardised per rule with leave-group-out scores of the training items:
    z = (s - mean_ok) / std_ok, where mean/std are over training ok items' LOGO scores."""
    def fn(X, tr, te):
        Xc = center(X, tr) if ctr else X
        V, comp = exemplar_sets(tr)
        mask = GROUP[tr][:, None] == GROUP[None, :]
        str_ = knn_scores(Xc[tr], Xc, V, comp, k, mask=mask)
        ste = knn_scores(Xc[te], Xc, V, comp, k)
        ok = Y[tr] == 0
        if mode == "z":
            mu = str_[ok].mean(0); sd = str_[ok].std(0)
            return (ste - mu) / sd
        # platt per rule: category c vs ok on LOGO scores
        out = np.zeros_like(ste)
        for c in range(R):
            m = ok | (CAT[tr] == c)
            clf = LogisticRegression(C=100).fit(str_[m, c:c + 1], (CAT[tr][m] == c).astype(int))
            out[:, c] = clf.decision_function(ste[:, c:c + 1])
        return out
    return fn


def lr_multi(C=10.0, scary_w=1.0, ctr=False, balanced=True):
    """Multinomial LR over {ok, 7 rules}; rule score = log p(c) - log p(ok)."""
    def fn(X, tr, te):
        Xc = center(X, tr) if ctr else X
        y = CAT[tr] + 1
        w = np.where(SCARY[tr], scary_w, 1.0)
        clf = LogisticRegression(C=C, max_iter=3000, class_weight="balanced" if balanced else None).fit(Xc[tr], y, sample_weight=w)
        lp = clf.predict_log_proba(Xc[te])
        cls = list(clf.classes_)
        out = np.full((len(te), R), -30.0)
        for c in range(R):
            if c + 1 in cls:
                out[:, c] = lp[:, cls.index(c + 1)] - lp[:, cls.index(0)]
        return out
    return fn


def zcomb(*fns, weights=None):
    """Average of per-rule scores after z-scoring each method's rule scores on training ok items.
    Training-side statistics come from the inner OOF of each method (nested, so slower)."""
    raise NotImplementedError


def knn_raw(Xq, Xe, V, comp, k, mask=None):
    """Unsubtracted features: top-k mean to each rule's violating exemplars, then to the compliant pool."""
    S = Xq @ Xe.T
    if mask is not None:
        S = np.where(mask, -1.0, S)
    return np.stack([topk_mean(S[:, v], k) for v in V] + [topk_mean(S[:, comp], k)], 1)


def stack_feats(models, k=10, use_emb=True, use_knn=True, ctr_knn=False, emb_scale=True, emb_w=1.0, ks=None, split=False):
    """Feature builder over several embeddings (X is a dict name->array):
    [standardised embeddings..., kNN rule scores per model (LOGO on training rows)], all standardised."""
    def feats(Xd, tr, te):
        A, B = [], []
        for mname in models:
            X = Xd[mname]
            if use_emb:
                mu = X[tr].mean(0); sd = X[tr].std(0) if emb_scale else 1.0
                A.append(emb_w * (X[tr] - mu) / sd); B.append(emb_w * (X[te] - mu) / sd)
            if use_knn:
                Xc = center(X, tr) if ctr_knn else X
                V, comp = exemplar_sets(tr)
                mask = GROUP[tr][:, None] == GROUP[None, :]
                f = knn_raw if split else knn_scores
                ktr = np.hstack([f(Xc[tr], Xc, V, comp, kk, mask=mask) for kk in (ks or [k])])
                kte = np.hstack([f(Xc[te], Xc, V, comp, kk) for kk in (ks or [k])])
                mu = ktr.mean(0); sd = ktr.std(0)
                A.append((ktr - mu) / sd); B.append((kte - mu) / sd)
        return np.hstack(A), np.hstack(B)
    return feats


def head(models, C=0.1, k=10, neg="ok", scary_w=1.0, balanced=True, overall=False, **fk):
    feats = stack_feats(models, k, **fk)
    def fn(Xd, tr, te):
        Ftr, Fte = feats(Xd, tr, te)
        if overall:
            w = np.where(SCARY[tr], scary_w, 1.0)
            return _lr(C, "balanced" if balanced else None).fit(Ftr, Y[tr], sample_weight=w).decision_function(Fte)
        res = np.zeros((len(te), R))
        for c in range(R):
            m = np.ones(len(tr), bool) if neg == "all" else ((CAT[tr] == c) | (Y[tr] == 0))
            y = (CAT[tr][m] == c).astype(int)
            w = np.where(SCARY[tr][m], scary_w, 1.0)
            clf = _lr(C, "balanced" if balanced else None).fit(Ftr[m], y, sample_weight=w)
            res[:, c] = clf.decision_function(Fte)
        return res
    return fn
