#!/usr/bin/env bash
# Resident memory of `charter serve` (default model and constitution): VmRSS and VmHWM
# once /readyz is 200, and again after 400 dev texts from 32 concurrent clients.
#   bench/rss.sh [VAR=value ...]     (extra environment for the server, e.g. CHARTER__...)
# Build first: cargo build --release. Uses port 8099 and a throw-away audit database.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
env "$@" CHARTER__DATABASE__URL="sqlite://$scratch/audit.db?mode=rwc" \
    CHARTER__AUDIT__SPOOL_DIR="$scratch/spool" CHARTER__LOG__FILTER=warn \
    target/release/charter serve --bind 127.0.0.1:8099 &
pid=$!
for _ in $(seq 1 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8099/readyz)" = 200 ] && break
    sleep 0.5
done
mem() { grep -E 'VmRSS|VmHWM' "/proc/$pid/status" | tr -s ' \t' ' ' | tr '\n' ' '; }
echo "ready:      $(mem)"
python3 - <<'PY'
import concurrent.futures as cf, json, os, urllib.request
dev = os.path.join("..", "shared", "bench", "dev.jsonl")
texts = [json.loads(l)["text"][:600] for l, _ in zip(open(dev, encoding="utf-8"), range(400))]
def go(t):
    r = urllib.request.Request("http://127.0.0.1:8099/v1/evaluate", json.dumps({"text": t}).encode(),
                               {"content-type": "application/json"})
    return urllib.request.urlopen(r).status
with cf.ThreadPoolExecutor(32) as ex:
    print(sum(s == 200 for s in ex.map(go, texts)), "of", len(texts), "answered 200")
PY
echo "after load: $(mem)"
kill "$pid"
wait "$pid" 2>/dev/null || true
