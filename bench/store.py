#!/usr/bin/env python3
"""What the audit store costs: the same load on /v1/evaluate with the store off and on.

Starts `target/release/charter serve` once per mode and round (modes interleaved, their
order rotated each round), sends the same single-text requests from N keep-alive
clients, and measures throughput, latency and the server's CPU time per request (user +
system from /proc, a figure that other jobs on the machine do not move). Prints a
Markdown table of medians over rounds and the overhead of each mode against `off`.

Modes:
  off        audit.enabled = false (records only logged at debug level; the baseline)
  sqlite     the default: SQLite file, spool with 100 ms group fsync
  postgres   PostgreSQL at 127.0.0.1:5432 (a fresh database per run)
  fsync0     SQLite, audit.fsync_interval_ms = 0 (fsync every record before answering)

usage: python bench/store.py [--rounds 3] [--requests 1500] [--concurrency 8]
                             [--modes off,sqlite,postgres,fsync0]
Build first: cargo build --release.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "charter")
DEV = os.path.join(os.path.dirname(ROOT), "shared", "bench", "dev.jsonl")
TICK = os.sysconf("SC_CLK_TCK")


def texts(n: int = 500) -> list[bytes]:
    out = []
    if os.path.exists(DEV):
        with open(DEV, encoding="utf-8") as f:
            for line in f:
                out.append(json.loads(line)["text"][:600])
                if len(out) == n:
                    break
    if not out:  # no shared benchmark set: varied synthetic texts
        out = [f"Message {i}: how do I keep basil alive on a balcony in summer?" for i in range(n)]
    return [json.dumps({"text": t}).encode() for t in out]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-q", "-c", sql], check=True)


class Server:
    def __init__(self, mode: str, workdir: str):
        self.port = free_port()
        self.db_name = None
        env = dict(os.environ)
        env.update({
            "CHARTER__LOG__FILTER": "warn",
            "CHARTER__AUDIT__SPOOL_DIR": os.path.join(workdir, "spool"),
            "CHARTER__DATABASE__URL": f"sqlite://{os.path.join(workdir, 'audit.db')}?mode=rwc",
        })
        if mode == "off":
            env["CHARTER__AUDIT__ENABLED"] = "false"
        elif mode == "postgres":
            self.db_name = "charter_bench_" + uuid.uuid4().hex
            psql(f"CREATE DATABASE {self.db_name}")
            env["CHARTER__DATABASE__URL"] = f"postgres://postgres@127.0.0.1:5432/{self.db_name}"
        elif mode == "fsync0":
            env["CHARTER__AUDIT__FSYNC_INTERVAL_MS"] = "0"
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() - started > 300:
                raise SystemExit(f"charter ({mode}) did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        if self.db_name:
            psql(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")


def load(port: int, bodies: list[bytes], requests: int, concurrency: int):
    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    errors = [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= requests:
                return
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/evaluate", body=bodies[i % len(bodies)],
                             headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sorted(latencies), errors[0]


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p / 100)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--modes", default="off,sqlite,postgres,fsync0")
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        raise SystemExit("build first: cargo build --release")
    modes = args.modes.split(",")
    bodies = texts()
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for mode in order:
            workdir = tempfile.mkdtemp(prefix="charter-bench-")
            try:
                server = Server(mode, workdir)
                load(server.port, bodies, 100, args.concurrency)  # warm-up
                cpu0 = cpu_seconds(server.proc.pid)
                wall, lat, errors = load(server.port, bodies, args.requests, args.concurrency)
                cpu = cpu_seconds(server.proc.pid) - cpu0
                server.stop()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            run = {
                "mode": mode, "round": r, "requests": args.requests, "errors": errors,
                "throughput": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3,
                "p99_ms": pct(lat, 99) * 1e3, "cpu_ms_per_request": cpu * 1e3 / max(1, len(lat)),
            }
            runs[mode].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    print(f"\n{args.requests} single-text requests, {args.concurrency} clients, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| mode | texts/s | vs off | server CPU ms/text | vs off | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    base_tp = med("off", "throughput") if "off" in runs else None
    base_cpu = med("off", "cpu_ms_per_request") if "off" in runs else None
    for mode in modes:
        tp, cpu = med(mode, "throughput"), med(mode, "cpu_ms_per_request")
        d_tp = f"{(tp / base_tp - 1) * 100:+.1f}%" if base_tp else "-"
        d_cpu = f"{(cpu / base_cpu - 1) * 100:+.1f}%" if base_cpu else "-"
        errors = sum(x["errors"] for x in runs[mode])
        print(f"| {mode} | {tp:.1f} | {d_tp} | {cpu:.2f} | {d_cpu} | "
              f"{med(mode, 'p50_ms'):.1f} | {med(mode, 'p99_ms'):.1f} | {errors} |")


if __name__ == "__main__":
    main()
