import sys, json, numpy as np
sys.path.insert(0, "/work/main/wip/research")
import common
from head import Head, _norm, _topk_mean
from sklearn.linear_model import LogisticRegression
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import roc_auc_score
import scipy.sparse as sp
D = common.load_dev()
RULES = common.RULES
Y = np.array([d["y"] for d in D]); CAT = np.array([RULES.index(d["category"]) if d["y"] else -1 for d in D])
LANG = np.array([d["lang"] for d in D]); SRC = np.array([d["source"] for d in D])
SCARY = np.array([d["scary"] for d in D]).astype(bool); GROUP = np.array([d["group"] for d in D])
TEXT = [d["text"] for d in D]
FOLD = common.folds(D, 5, 0)
U = np.load("/tmp/exp/use.npy")

def report(name, S):
    r = S.max(1) if S.ndim > 1 else S
    a = roc_auc_score(Y, r); ae = roc_auc_score(Y[LANG=="en"], r[LANG=="en"]); az = roc_auc_score(Y[LANG=="zh"], r[LANG=="zh"])
    sp_ = np.sort(r[Y==1])[::-1]; t = sp_[int(np.ceil(0.82*len(sp_)))-1]-1e-6
    pred = r > t
    fs = pred[SCARY].mean()
    m = SRC=="openai-moderation"; yo=Y[m]; po=pred[m]
    tp=(yo&po).sum(); f1o = 2*tp/(yo.sum()+po.sum())
    # oracle best F1 oai
    ro=r[m]; best=0
    for tt in np.unique(ro):
        p=ro>=tt; tp=(yo&p).sum(); best=max(best,2*tp/(yo.sum()+p.sum()))
    print(f"{name:40s} auc {a:.3f} en {ae:.3f} zh {az:.3f} | r82: fpr_scary {fs:.3f} fpr_ok {pred[Y==0].mean():.3f} F1oai {f1o:.3f} (oracle {best:.3f})", flush=True)
    return r

def cv(method):
    S = np.zeros((len(D), 7))
    for f in range(5):
        tr = np.where(FOLD != f)[0]; te = np.where(FOLD == f)[0]
        S[te] = method(tr, te)
    return S

def c3(tr, te):
    h = Head(["use"], scary_w=3.0).fit({"use": U[tr]}, CAT[tr], GROUP[tr], scary=SCARY[tr])
    return h.score({"use": U[te]})

def tfidf_only(tr, te, C=1.0, an="char_wb", ng=(1,4)):
    v = TfidfVectorizer(analyzer=an, ngram_range=ng, sublinear_tf=True, min_df=2)
    Xtr = v.fit_transform([TEXT[i] for i in tr]); Xte = v.transform([TEXT[i] for i in te])
    out = np.full((len(te), 7), -30.0)
    w = np.where(SCARY[tr], 3.0, 1.0)
    for r in range(7):
        sel = (CAT[tr]==r)|(CAT[tr]<0)
        if (CAT[tr]==r).sum()==0: continue
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=3000)
        clf.fit(Xtr[sel], (CAT[tr][sel]==r).astype(int), sample_weight=w[sel])
        out[:, r] = clf.decision_function(Xte)
    return out

if __name__ == "__main__":
    S_c3 = cv(c3); report("C3 USE head", S_c3)
    for C in (1.0, 10.0):
        S_t = cv(lambda tr, te: tfidf_only(tr, te, C=C)); report(f"tfidf char_wb 1-4 C={C}", S_t)
        for a in (0.3, 0.5, 1.0):
            report(f"  C3 + {a}*tfidf", S_c3 + a*S_t)
    np.save("/tmp/exp/S_c3.npy", S_c3)
