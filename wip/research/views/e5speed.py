import json, time, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
M="/work/main/assets/models/e5-small"
so=ort.SessionOptions(); so.intra_op_num_threads=2
s=ort.InferenceSession(M+"/model.onnx", so)
print([ (i.name, i.type) for i in s.get_inputs()], [o.name for o in s.get_outputs()])
from collections import Counter
print(Counter(n.op_type for n in __import__('onnx').load(M+"/model.onnx").graph.node).most_common(8))
tok=Tokenizer.from_file(M+"/tokenizer.json"); tok.no_padding(); tok.enable_truncation(512)
D=[json.loads(l) for l in open("/work/shared/bench/dev.jsonl")][:300]
encs=sorted([tok.encode("query: "+d["text"]).ids for d in D], key=len)
t=time.time(); n=0
for i in range(0, len(encs), 32):
    b=encs[i:i+32]; L=max(map(len,b))
    ids=np.zeros((len(b),L),np.int64); am=np.zeros_like(ids)
    for r,e in enumerate(b): ids[r,:len(e)]=e; am[r,:len(e)]=1
    s.run(None, {"input_ids":ids,"attention_mask":am,"token_type_ids":np.zeros_like(ids)})
    n+=len(b)
print("texts/s", n/(time.time()-t), "mean tokens", np.mean([len(e) for e in encs]))
