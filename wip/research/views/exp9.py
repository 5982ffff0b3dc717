import sys; sys.argv=[sys.argv[0]]
exec(open("/tmp/exp/exp4.py").read().split('for models in')[0])
import head as H
class Mixed(Head):
    """embedding features from view e, kNN features from view k"""
    def __init__(self, e, k, **kw):
        super().__init__([k], **kw); self.e = e; self.kv = k
    def _feats(self, Qd, masks=None):
        st = self.st[self.kv]
        E = Qd[self.e]
        F = [self.emb_w * (E - self.emu) / self.esd]
        kf = self._knn(self.kv, Qd[self.kv], masks)
        F.append((kf - st["kmu"]) / st["ksd"])
        return np.hstack(F)
    def fit(self, Xd, cat, groups, scary=None):
        self.emu = Xd[self.e].mean(0); self.esd = Xd[self.e].std(0)
        return super().fit(Xd, cat, groups, scary=scary)
def run(name, e, k, w):
    def f(tr, te):
        h = Mixed(e, k, scary_w=3.0, emb_w=w).fit({e: V[e][tr], k: V[k][tr]}, CAT[tr], GROUP[tr], scary=SCARY[tr])
        return h.score({e: V[e][te], k: V[k][te]})
    S = cv(f); report(name, S); return S
run("emb cat_b, knn use", "cat_b", "use", 0.122)
run("emb cat_b, knn use, w.2", "cat_b", "use", 0.2)
V["um"] = nz(np.hstack([V["use"], V["mf"]]))
run("emb cat_b, knn use+mf", "cat_b", "um", 0.122)
