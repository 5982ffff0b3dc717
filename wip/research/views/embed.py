import json, sys, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
M = "/work/main/assets/models/use-m3"
tok = Tokenizer.from_file(M + "/tokenizer.json")
tok.enable_truncation(512)
so = ort.SessionOptions(); so.intra_op_num_threads = 2
sess = ort.InferenceSession(M + "/model.onnx", so)
D = [json.loads(l) for l in open("/work/shared/bench/dev.jsonl")]
encs = [tok.encode(d["text"]) for d in D]
out = np.zeros((len(D), 512), np.float32)
order = np.argsort([len(e.ids) for e in encs])
i = 0
while i < len(order):
    j = i; n = 0
    while j < len(order) and (j == i or (j - i + 1) * len(encs[order[j]].ids) <= 4096):
        j += 1
    idx = order[i:j]; L = max(len(encs[k].ids) for k in idx)
    ids = np.zeros((len(idx), L), np.int64); am = np.zeros((len(idx), L), np.int64)
    for r, k in enumerate(idx):
        e = encs[k].ids; ids[r, :len(e)] = e; am[r, :len(e)] = 1
    o = sess.run(None, {"input_ids": ids, "attention_mask": am})[0]
    out[idx] = o
    i = j
np.save("/tmp/exp/use.npy", out)
print(out.shape, np.linalg.norm(out, axis=1)[:5])
