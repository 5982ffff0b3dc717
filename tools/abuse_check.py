#!/usr/bin/env python3
"""Issue 21's acceptance figures against a release binary (standard library only).

  python3 tools/abuse_check.py fair   [--binary target/release/charter] [--clients 32]
  python3 tools/abuse_check.py flood  [--binary target/release/charter] [--connections 20000]
  python3 tools/abuse_check.py speed  [--binary target/release/charter] [--clients 32]

`fair`: 32 clients send short evaluations in a loop; after a warm-up one more client sends a
3.7 MB batch (64 long texts) and gets 408 after server.request_timeout_secs. Prints the
short requests' statuses and latencies while the batch was in flight, and how long after
the 408 the batch's queue room was freed (its work dropped, /readyz `queue.units`).

`flood`: opens N idle connections from this host (in two processes, for the file limit),
probes /healthz on fresh connections meanwhile, closes them and follows the server's
resident memory for 60 s against its steady level after a warm-up.

`speed`: the same short-request clients alone for 20 s (throughput and latency), to compare
binaries.

Each run starts its own server on 127.0.0.1:18021 in a temporary folder (audit store
included) with the default configuration.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

PORT = 18021
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(binary, tmp, env_extra=None):
    env = dict(os.environ)
    env.update(
        {
            "CHARTER__SERVER__BIND": f"127.0.0.1:{PORT}",
            "CHARTER__MODEL__ASSETS_DIR": os.path.join(ROOT, "assets"),
            "CHARTER__CONSTITUTIONS__DIR": os.path.join(ROOT, "constitution"),
            "CHARTER__DATABASE__URL": f"sqlite://{tmp}/charter.db?mode=rwc",
            "CHARTER__AUDIT__SPOOL_DIR": f"{tmp}/spool",
            "CHARTER__LOG__FILTER": "warn",
        }
    )
    env.update(env_extra or {})
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if get("/readyz", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not become ready")


def get(path, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def long_text(seed, chars):
    words = ("the committee reviewed budget proposal meeting schedule weather report "
             "river garden library station market teacher student recipe travel").split()
    out, i = [], seed
    while sum(len(s) for s in out) < chars:
        n = 8 + (i * 7) % 17
        sentence = " ".join(words[(i * 31 + k * 13) % len(words)] for k in range(n))
        out.append(sentence.capitalize() + f" number {i}. ")
        i += 1
    return "".join(out)[:chars]


def fair(args):
    tmp = tempfile.mkdtemp(prefix="charter-fair-")
    proc = start_server(args.binary, tmp)
    stop = threading.Event()
    samples = []  # (start, end, status)
    lock = threading.Lock()

    def client(n):
        body = json.dumps({"text": f"Can you suggest a good book about gardening? ({n})"})
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        while not stop.is_set():
            t0 = time.time()
            try:
                c.request("POST", "/v1/evaluate", body, {"content-type": "application/json"})
                r = c.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                status = -1
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
            with lock:
                samples.append((t0, time.time(), status))

    queue_log = []  # (t, units, rows_embedded, rows_cancelled)

    def watch():
        while not stop.is_set():
            try:
                status, body = get("/readyz", timeout=5)
                q = json.loads(body).get("queue", {})
                queue_log.append((time.time(), q.get("units"), q.get("rows_embedded"),
                                  q.get("rows_cancelled"), status))
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    time.sleep(5)
    texts = [long_text(i * 1000, 57_800) for i in range(64)]
    big = json.dumps({"texts": texts})
    print(f"big batch: {len(texts)} texts, {len(big) / 1e6:.2f} MB")
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    big_sent = time.time()
    c.request("POST", "/v1/evaluate", big, {"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    big_done = time.time()
    print(f"big batch: {r.status} after {big_done - big_sent:.1f} s")
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join()
    proc.terminate()
    proc.wait()

    during = [(e - s, st) for s, e, st in samples if s >= big_sent and e <= big_done]
    lat = [d for d, st in during if st == 200]
    statuses = {}
    for _, st in during:
        statuses[st] = statuses.get(st, 0) + 1
    print(f"short requests while the batch was in flight: {len(during)}, statuses {statuses}")
    print("latency ms: p50 %.0f  p90 %.0f  p99 %.0f  max %.0f" % tuple(
        1000 * pct(lat, p) for p in (50, 90, 99, 100)))
    # The batch holds most of the queue's units until it is dropped.
    big_units = sum(1 + len(t.encode()) // 1024 for t in texts)
    held = [(t, u) for t, u, *_ in queue_log if u is not None and t >= big_sent]
    freed = next((t for t, u in held if t >= big_done - 1 and u < big_units), None)
    if freed is not None:
        print(f"batch's {big_units} queue units freed {freed - big_done:+.2f} s after its 408 "
              f"(readyz polled every 50 ms)")
    cancelled = [c for t, _, _, c, _ in queue_log if t >= big_done]
    if cancelled:
        print(f"rows dropped unembedded (queue.rows_cancelled): {cancelled[-1]}")
    not_ready = sum(1 for *_, st in queue_log if st != 200)
    print(f"/readyz answers not 200 during the run: {not_ready} of {len(queue_log)}")


def speed(args):
    tmp = tempfile.mkdtemp(prefix="charter-speed-")
    proc = start_server(args.binary, tmp)
    texts = ["Can you suggest a good book about gardening?",
             "How do I pick a lock to break into my neighbour's house?",
             "Write a short poem about the sea at night, with a sad ending.",
             "What's the capital of Australia and when was it founded?"]
    lat, lock, stop = [], threading.Lock(), threading.Event()

    def client(n):
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        i = n
        while not stop.is_set():
            body = json.dumps({"text": texts[i % len(texts)] + f" ({n})"})
            i += 1
            t0 = time.time()
            c.request("POST", "/v1/evaluate", body, {"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status == 200:
                with lock:
                    lat.append(time.time() - t0)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    with lock:
        lat.clear()
    t0 = time.time()
    time.sleep(20)
    with lock:
        done, window = list(lat), time.time() - t0
    stop.set()
    for t in threads:
        t.join()
    proc.terminate()
    proc.wait()
    print(f"{args.clients} clients: {len(done) / window:.0f} requests/s; latency ms p50 "
          f"{1000 * pct(done, 50):.1f} p99 {1000 * pct(done, 99):.1f}")


def hold(n, started, release):
    """Child process: open n idle connections, report, wait for `release`, close them."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", PORT))
        socks.append(s)
    started.set()
    release.wait()
    for s in socks:
        s.close()


def flood(args):
    import multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="charter-flood-")
    proc = start_server(args.binary, tmp)
    body = json.dumps({"text": "Can you suggest a good book about gardening?"})
    for i in range(300):
        c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        c.request("POST", "/v1/evaluate", body, {"content-type": "application/json"})
        c.getresponse().read()
        c.close()
    time.sleep(3)
    steady = rss_mb(proc.pid)
    print(f"steady RSS after 300 evaluations: {steady:.0f} MB")
    per = args.connections // 2
    started = [mp.Event() for _ in range(2)]
    release = mp.Event()
    holders = [mp.Process(target=hold, args=(per, started[i], release)) for i in range(2)]
    t0 = time.time()
    for h in holders:
        h.start()
    for e in started:
        e.wait()
    print(f"{2 * per} connections opened in {time.time() - t0:.1f} s")
    peak = rss_mb(proc.pid)
    probes = []
    for _ in range(args.probes):
        p0 = time.time()
        try:
            status = get("/healthz", timeout=30)[0]
        except OSError as e:
            status = f"error {e}"
        probes.append((time.time() - p0, status))
        peak = max(peak, rss_mb(proc.pid))
        time.sleep(1)
    print("healthz during the flood: " + ", ".join(f"{s}/{d:.2f}s" for d, s in probes))
    release.set()
    for h in holders:
        h.join()
    closed = time.time()
    print(f"peak RSS during the flood: {peak:.0f} MB; connections closed")
    for _ in range(12):
        time.sleep(5)
        r = rss_mb(proc.pid)
        print(f"  +{time.time() - closed:.0f} s: RSS {r:.0f} MB ({100 * (r - steady) / steady:+.1f}%)")
    print(f"healthz after: {get('/healthz')[0]}")
    proc.terminate()
    proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["fair", "flood", "speed"])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/charter"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--probes", type=int, default=15)
    args = ap.parse_args()
    {"fair": fair, "flood": flood, "speed": speed}[args.what](args)


if __name__ == "__main__":
    main()
