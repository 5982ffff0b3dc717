import sys; sys.argv=[sys.argv[0]]
exec(open("/tmp/exp/exp9.py").read().split('run("emb cat_b, knn use"')[0])
def run2(name, e, k, w, sw):
    def f(tr, te):
        h = Mixed(e, k, scary_w=sw, emb_w=w).fit({e: V[e][tr], k: V[k][tr]}, CAT[tr], GROUP[tr], scary=SCARY[tr])
        return h.score({e: V[e][te], k: V[k][te]})
    S = cv(f); report(name, S); return S
run2("emb cat_b, knn use sw6", "cat_b", "use", 0.122, 6.0)
run2("emb cat_b, knn use sw10", "cat_b", "use", 0.122, 10.0)
