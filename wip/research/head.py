"""Reference implementation of the recommended scorer ("kNN-feature linear head"), fit/score API.

Per embedding model m (USE-m3 and/or e5-small), for a query vector q (L2-normalised):
  e_m   = emb_w * (q - mu_m) / sd_m                         (per-dimension standardisation)
  qc_m  = normalise(q - c_m)                                 (c_m = mean training embedding)
  s_m,r = topk_mean(E_m[V_r] . qc_m, k) - topk_mean(E_m[comp] . qc_m, k)   for each rule r
  f_m,r = (s_m,r - kmu_m,r) / ksd_m,r                        (standardised kNN features)
Rule r logit = w_r . [e_1, f_1, e_2, f_2, ...] + b_r  (logistic regression, class_weight balanced,
trained on rule-r violations vs ok items only). Risk = max_r logit. E_m rows are the centred,
re-normalised exemplar embeddings. Training kNN features are leave-own-group-out.
"""
import numpy as np
from sklearn.linear_model import LogisticRegression

R = 7


def _norm(A):
    return A / np.linalg.norm(A, axis=-1, keepdims=True)


def _topk_mean(S, k):
    k = min(k, S.shape[1])
    return np.partition(S, -k, axis=1)[:, -k:].mean(1)


class Head:
    def __init__(self, models, k=10, C=0.1, emb_w=0.3, center=True, use_emb=True, scary_w=1.0):
        self.models, self.k, self.C, self.emb_w, self.center = list(models), k, C, emb_w, center
        self.use_emb, self.scary_w = use_emb, scary_w

    def _knn(self, m, Q, mask=None):
        st = self.st[m]
        Qc = _norm(Q - st["c"]) if self.center else Q
        S = Qc @ st["E"].T
        if mask is not None:
            S = np.where(mask, -1.0, S)
        cs = _topk_mean(S[:, st["comp"]], self.k)
        return np.stack([_topk_mean(S[:, v], self.k) - cs for v in st["V"]], 1)

    def _feats(self, Qd, masks=None):
        F = []
        for m in self.models:
            st = self.st[m]; Q = Qd[m]
            if self.use_emb:
                F.append(self.emb_w * (Q - st["mu"]) / st["sd"])
            kf = self._knn(m, Q, None if masks is None else masks)
            F.append((kf - st["kmu"]) / st["ksd"])
        return np.hstack(F)

    def fit(self, Xd, cat, groups, scary=None, extra=None, extra_groups=None):
        """Xd: {model: (n, d)} exemplar embeddings; cat: (n,) rule index or -1 for ok.
        extra: optional {model: (m, d)} additional compliant exemplars (e.g. windows of ok texts or
        neutral background prose), with their groups for leave-group-out features."""
        if extra is not None:
            Xd = {m: np.vstack([Xd[m], extra[m]]) for m in self.models}
            cat = np.concatenate([cat, -np.ones(len(extra_groups), int)])
            groups = np.concatenate([groups, extra_groups])
            if scary is not None:
                scary = np.concatenate([scary, np.zeros(len(extra_groups), bool)])
        self.st = {}
        n = len(cat)
        mask = groups[:, None] == groups[None, :]
        for m in self.models:
            X = Xd[m]
            c = X.mean(0)
            st = {"mu": X.mean(0), "sd": X.std(0), "c": c,
                  "E": _norm(X - c) if self.center else X,
                  "V": [np.where(cat == r)[0] for r in range(R)], "comp": np.where(cat < 0)[0]}
            self.st[m] = st
            ktr = self._knn(m, X, mask)
            st["kmu"], st["ksd"] = ktr.mean(0), ktr.std(0)
        F = self._feats(Xd, mask)
        w_all = np.ones(n) if scary is None else np.where(scary, self.scary_w, 1.0)
        self.W = np.zeros((R, F.shape[1])); self.b = np.zeros(R)
        for r in range(R):
            sel = (cat == r) | (cat < 0)
            if (cat == r).sum() == 0:
                self.b[r] = -30.0
                continue
            clf = LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000)
            clf.fit(F[sel], (cat[sel] == r).astype(int), sample_weight=w_all[sel])
            self.W[r] = clf.coef_[0]; self.b[r] = clf.intercept_[0]
        return self

    def score(self, Qd):
        """(m, 7) rule logits."""
        return self._feats(Qd) @ self.W.T + self.b
