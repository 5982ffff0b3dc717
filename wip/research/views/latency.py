import time, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
M="/work/main/assets/models/use-m3"
so=ort.SessionOptions(); so.intra_op_num_threads=2
s=ort.InferenceSession(M+"/model.onnx", so)
tok=Tokenizer.from_file(M+"/tokenizer.json")
for text in ["How do I kill a Python process?", " ".join(["The quick brown fox jumps over the lazy dog."]*10)]:
    e=tok.encode(text).ids; ids=np.array([e],np.int64); am=np.ones_like(ids)
    for outs in (["sentence_embedding"], ["sentence_views"], ["sentence_embedding"], ["sentence_views"]):
        for _ in range(50): s.run(outs, {"input_ids":ids,"attention_mask":am})
        t=time.perf_counter(); N=1000
        for _ in range(N): s.run(outs, {"input_ids":ids,"attention_mask":am})
        print(len(e), outs, "%.3f ms" % ((time.perf_counter()-t)/N*1e3))
