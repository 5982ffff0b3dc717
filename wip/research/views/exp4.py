import sys; sys.argv=[sys.argv[0]]
exec(open("/tmp/exp/exp2.py").read().split('S0 = np.load')[0])
def nz(X): return X/np.linalg.norm(X,axis=1,keepdims=True)
Xmax = np.load("/tmp/exp/f_maxpool.npy").astype(np.float64)
V["cat_a"] = nz(np.hstack([V["use"], V["max"], V["mf"]]))
V["cat_b"] = nz(np.hstack([V["use"], V["maxc"], V["mf"]]))
V["cat_c"] = nz(np.hstack([V["use"], V["maxc"]]))
for models in (["cat_a"], ["cat_b"], ["cat_c"]):
    def f(tr, te, models=models):
        h = Head(models, scary_w=3.0).fit({m: V[m][tr] for m in models}, CAT[tr], GROUP[tr], scary=SCARY[tr])
        return h.score({m: V[m][te] for m in models})
    S = cv(f); report("+".join(models), S); np.save("/tmp/exp/S_" + "_".join(models) + ".npy", S)
