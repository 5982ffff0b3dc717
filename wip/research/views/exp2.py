import sys; sys.argv=[sys.argv[0]]
exec(open("/tmp/exp/exp1.py").read().split('if __name__')[0])
def L(n):
    X = np.load(f"/tmp/exp/f_{n}.npy").astype(np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)
V = {"use": U.astype(np.float64), "max": L("maxpool"), "mf": L("meanfeats"), "pool": L("pooled_scaled_193"), "y1": L("y1_202")}
# max-pool: center before norm?
Xm = np.load("/tmp/exp/f_maxpool.npy").astype(np.float64); Xm = Xm - Xm.mean(0); V["maxc"] = Xm/np.linalg.norm(Xm,axis=1,keepdims=True)
def mk(models, **kw):
    def f(tr, te):
        h = Head(models, scary_w=3.0, **kw).fit({m: V[m][tr] for m in models}, CAT[tr], GROUP[tr], scary=SCARY[tr])
        return h.score({m: V[m][te] for m in models})
    return f
S0 = np.load("/tmp/exp/S_c3.npy"); report("C3 USE", S0)
for models in (["max"], ["maxc"], ["mf"], ["use","max"], ["use","maxc"], ["use","mf"], ["use","pool"], ["use","y1"], ["use","max","mf"]):
    S = cv(mk(models)); report("+".join(models), S); np.save("/tmp/exp/S_" + "_".join(models) + ".npy", S)
