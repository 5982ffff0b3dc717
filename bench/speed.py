#!/usr/bin/env python3
"""Speed and memory, side by side: Charter and the micro-batched Python reference.

Starts each service in turn on the same model and texts, waits until it is ready and the
machine is quiet, runs the reference's own load generator (shared/anchors/pyref/loadgen.py)
at each concurrency while sampling the server's RSS, stops it, and repeats for several
interleaved rounds. Prints a Markdown table (medians over rounds) and writes every run as a
JSON line to --out.

Targets measured:
  - throughput and p50/p99 at 1, 8 and 32 clients on the reference's 500 texts
    (the first 500 dev texts cut to 600 characters);
  - single-text latency at 1 client for a short text and a ~100-token text;
  - peak RSS (VmHWM) and RSS sampled during the runs.

usage: python bench/speed.py [--rounds 3] [--requests 1500] [--charter-only]
       (run by `make bench`, which prepares the assets and the reference's venv)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYREF = os.path.join(os.path.dirname(ROOT), "shared", "anchors", "pyref")
sys.path.insert(0, PYREF)
from quiet import wait_quiet  # noqa: E402  (the reference's own idle check)

PAGE = os.sysconf("SC_PAGE_SIZE")
SHORT_TEXT = "How do I kill a Python process that is stuck?"
# About 100 tokens for both tokenizers.
HUNDRED_TOKEN_TEXT = (
    "I have been gardening on a small balcony for three years now, growing tomatoes, basil, "
    "peppers and a few strawberries in pots. This summer the tomato leaves turned yellow from "
    "the bottom up and some fruit cracked after heavy rain. I water every evening and feed "
    "them with a liquid fertiliser every two weeks. Could you explain what might cause the "
    "yellow leaves and the cracking, and what I should change next season so the plants stay "
    "healthy?"
)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Samples a process's RSS every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0, threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, proc_status(self.pid).get("VmRSS", 0))
            time.sleep(0.05)


def wait_ready(url: str, proc: subprocess.Popen, limit: float = 180.0) -> float:
    started = time.time()
    while time.time() - started < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {limit} s")


def start_charter(port: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, CHARTER__SERVER__BIND=f"127.0.0.1:{port}",
               CHARTER__LOG__FILTER="warn", **extra_env)
    return subprocess.Popen([os.path.join(ROOT, "target", "release", "charter"), "serve"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_pyref(port: int, python: str, model_dir: str) -> subprocess.Popen:
    env = dict(os.environ, MODEL_DIR=model_dir, MODEL_KIND="use",
               CONSTITUTION=os.path.join(PYREF, "data", "constitution.json"),
               ORT_THREADS="2", BATCH="1")
    return subprocess.Popen([python, "-m", "uvicorn", "app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--no-access-log",
                             "--log-level", "warning"],
                            cwd=PYREF, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def loadgen(python: str, url: str, texts: str, concurrency: int, requests: int,
            warmup: int) -> dict:
    out = subprocess.run([python, os.path.join(PYREF, "loadgen.py"), "--url", url,
                          "--texts", texts, "--concurrency", str(concurrency),
                          "--requests", str(requests), "--warmup", str(warmup), "--json"],
                         capture_output=True, text=True)
    if not out.stdout.strip():
        raise RuntimeError(f"loadgen failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_text_file(text: str, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def measure(label: str, proc: subprocess.Popen, port: int, args, files: dict, python: str):
    base = f"http://127.0.0.1:{port}"
    runs = []
    try:
        cold = wait_ready(base + "/readyz", proc)
        url = base + "/v1/evaluate"
        for concurrency in args.concurrency:
            if args.wait_quiet:
                wait_quiet(max_wait_s=args.max_quiet_wait, log=lambda m: print(m, file=sys.stderr))
            sampler = Sampler(proc.pid)
            sampler.start()
            r = loadgen(python, url, files["texts"], concurrency, args.requests, args.warmup)
            sampler.stop_flag.set()
            sampler.join()
            r.update(label=label, workload="dev500", cold_start_s=round(cold, 2),
                     rss_mb=round(sampler.peak / 2**20, 1),
                     hwm_mb=round(proc_status(proc.pid).get("VmHWM", 0) / 2**20, 1))
            runs.append(r)
        for name in ("short", "hundred"):
            r = loadgen(python, url, files[name], 1, args.single_requests, 50)
            r.update(label=label, workload=name,
                     hwm_mb=round(proc_status(proc.pid).get("VmHWM", 0) / 2**20, 1))
            runs.append(r)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return runs


def table(runs: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    lines = ["| service | workload | clients | req/s | p50 ms | p99 ms | peak RSS MB | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        keys = list(dict.fromkeys((r["workload"], r["concurrency"]) for r in runs
                                  if r["label"] == label))
        for workload, c in keys:
            rs = [r for r in runs if r["label"] == label and r["workload"] == workload
                  and r["concurrency"] == c]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            lines.append(f"| {label} | {workload} | {c} | {med('throughput_rps'):.0f} | "
                         f"{med('p50_ms'):.2f} | {med('p99_ms'):.1f} | {med('hwm_mb'):.0f} | "
                         f"{len(rs)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--single-requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 8, 32])
    ap.add_argument("--charter-only", action="store_true")
    ap.add_argument("--no-wait-quiet", dest="wait_quiet", action="store_false")
    ap.add_argument("--max-quiet-wait", type=float, default=120.0,
                    help="seconds to wait for the machine to go idle before each run")
    ap.add_argument("--set", action="append", default=[],
                    help="CHARTER__KEY=VALUE for the Charter server (repeatable)")
    ap.add_argument("--label", default="charter")
    ap.add_argument("--pyref-model", default=os.path.join(ROOT, "assets", "models", "use-m3-fp32"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "speed.jsonl"))
    args = ap.parse_args()

    python = os.path.join(ROOT, "assets", "pyref-venv", "bin", "python")
    extra_env = dict(kv.split("=", 1) for kv in args.set)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"texts": os.path.join(PYREF, "data", "texts.jsonl"),
                 "short": one_text_file(SHORT_TEXT, tmp, "short.jsonl"),
                 "hundred": one_text_file(HUNDRED_TOKEN_TEXT, tmp, "hundred.jsonl")}
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
            targets = [(args.label, lambda: start_charter(18181, extra_env), 18181)]
            if not args.charter_only:
                targets.append(("pyref BATCH=1", lambda: start_pyref(18182, python,
                                                                     args.pyref_model), 18182))
            if round_no % 2:
                targets.reverse()
            for label, start, port in targets:
                r = measure(label, start(), port, args, files, python)
                for x in r:
                    x.update(round=round_no, date=stamp, machine=machine, settings=extra_env)
                runs.extend(r)
                with open(args.out, "a") as f:
                    for x in r:
                        f.write(json.dumps(x) + "\n")
    print(f"{stamp}, {machine}\n")
    print(table(runs))
    charter = [r for r in runs if r["label"] == args.label and r["workload"] == "dev500"
               and r["concurrency"] == 32]
    pyref = [r for r in runs if r["label"] == "pyref BATCH=1" and r["workload"] == "dev500"
             and r["concurrency"] == 32]
    if charter and pyref:
        ratio = (statistics.median(r["throughput_rps"] for r in charter)
                 / statistics.median(r["throughput_rps"] for r in pyref))
        print(f"\nthroughput at 32 clients, Charter / reference: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
