"""Fit the recommended head on all of dev and write a small JSON the Rust service can load, with the
standardisations folded into the linear weights. Verifies folded scoring == Head.score.
Usage: python export_head.py MODELS [scary_w]     e.g. use+e5 3   -> head_use+e5.json
Rust-side scoring for a text (per model m, unit-norm embedding q):
  qc = normalise(q - center_m);  sims = E_m qc  where E_m rows = normalise(exemplar_emb - center_m)
  s_r = mean(top-k sims over rule r's violating exemplars) - mean(top-k sims over all compliant exemplars)
  logit_r = b_r + sum_m (W_emb[m][r] . q + W_knn[m][r] . s_m)
  rule r violated if logit_r > threshold; risk = max_r logit_r (or sigmoid of it)."""
import json, sys
import numpy as np
from evallib import *
from head import Head, _norm, _topk_mean

models = sys.argv[1].split("+"); sw = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
Xd = {m: np.load(f"{CACHE}/{m}_whole.npy").astype(np.float64) for m in models}
h = Head(models, scary_w=sw).fit(Xd, CAT, GROUP, scary=SCARY)

# fold the standardisations into the weights
out = {"rules": RULES, "k": h.k, "models": {}, "bias": None}
b = h.b.copy(); off = 0
for m in models:
    st = h.st[m]; d = Xd[m].shape[1]
    We = h.W[:, off:off + d] * h.emb_w / st["sd"]; off += d
    Wk = h.W[:, off:off + 7] / st["ksd"]; off += 7
    b -= We @ st["mu"] + Wk @ st["kmu"]
    out["models"][m] = {"center": st["c"].tolist(), "w_emb": We.tolist(), "w_knn": Wk.tolist()}
out["bias"] = b.tolist()


def folded(Q):
    L = np.tile(b, (len(Q[models[0]]), 1))
    for m in models:
        M = out["models"][m]; st = h.st[m]
        qc = _norm(Q[m] - np.array(M["center"]))
        S = qc @ st["E"].T
        cs = _topk_mean(S[:, st["comp"]], h.k)
        s = np.stack([_topk_mean(S[:, v], h.k) - cs for v in st["V"]], 1)
        L += Q[m] @ np.array(M["w_emb"]).T + s @ np.array(M["w_knn"]).T
    return L


Q = {m: Xd[m][:50] for m in models}
assert np.allclose(folded(Q), h.score(Q), atol=1e-6), "folding mismatch"

# thresholds: from 5-fold grouped OOF risk on dev with the same settings
# long-text margin delta: (1 - alpha) quantile of the OOF risk of benign sentence pieces (sentences of ok
# texts that split into >1 sentence, plus the neutral background docs) minus the threshold.
SP = {m: np.load(f"{CACHE}/{m}_sent.npy").astype(np.float64) for m in models}
SPo = np.load(f"{CACHE}/{models[0]}_sent_owner.npy"); NP = np.bincount(SPo, minlength=len(D))
BG = {m: np.load(f"{CACHE}/bg_{m}_sent.npy").astype(np.float64) for m in models}
oof = np.zeros(len(D)); benign = [h.score(BG).max(1)]
for f in range(5):
    tr = np.where(FOLD != f)[0]; te = np.where(FOLD == f)[0]
    hf = Head(models, scary_w=sw).fit({m: Xd[m][tr] for m in models}, CAT[tr], GROUP[tr], scary=SCARY[tr])
    oof[te] = hf.score({m: Xd[m][te] for m in models}).max(1)
    k = np.isin(SPo, te[Y[te] == 0]) & (NP[SPo] > 1)
    benign.append(hf.score({m: SP[m][k] for m in models}).max(1))
benign = np.concatenate(benign)
out["thresholds"] = {p: float(fn(Y, oof)) for p, fn in POLICIES.items()}
out["long_text"] = {"gate_tokens": 256, "pieces": "sentences (common.sentences)", "alpha": 0.01,
                    "delta_by_policy": {p: float(np.quantile(benign, 0.99) - t) for p, t in out["thresholds"].items()},
                    "rule": "rule score = max(whole_r, max over sentences of piece_r - delta) for texts over gate_tokens"}
out["exemplars"] = "all dev items: violating exemplars of rule r = dev violations with category r; compliant = all dev ok items"
out["contrastive_weight"] = sw
fn = f"{HERE}/head_{'+'.join(models)}{'_w%g' % sw if sw != 1 else ''}.json"
json.dump(out, open(fn, "w"))
print(fn, "thresholds", out["thresholds"], "long-text delta", out["long_text"]["delta_by_policy"])
