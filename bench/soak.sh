#!/usr/bin/env bash
# Soak: attacks from issue 19, each against a fresh sidecar per binary, bounded in time and
# count, loopback only. While an attack runs, a well-behaved client calls another listener and
# admin `/live` (a new connection each time, 2 s timeout, every 50 ms); reported per attack and
# binary: peak RSS, peak open descriptors, both success ratios, attack connections the sidecar
# still holds at the end. The sidecar runs under `prlimit --nofile=1024` (a common default).
# (Non-reading clients of a large response: bench/stall.sh; bridge JSON work against the proxy:
# bench/isolation.sh.)
#
#   fdflood   3,000 connections to one listener that send nothing (descriptors, item 3)
#   slowbody  200 requests whose bodies trickle 1 byte a second (item 4)
#   bridge    2,000 silent connections to the bridge (item 4: they took a listener down)
#
#   bench/soak.sh OLD_BINARY NEW_BINARY [SECONDS]     (default 15)
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); secs=${3:-15}
. "$(dirname "$0")/lib.sh"
need nginx python3 prlimit taskset
read -r UP < <(free_ports 1)
BENCH_CPU=0-1 start nginx -c "$(nginx_upstream $UP "location / { return 200 \"ok\\n\"; }" 'client_body_timeout 120s;')"

run() {  # attack label binary
  local attack=$1 label=$2 bin=$3
  cat > "$dir/c.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
app: { address: 127.0.0.1:$UP, probe: { enabled: false } }
listeners:
  - { name: attacked, address: 127.0.0.1:0 }
  - { name: other, address: 127.0.0.1:0 }
bridge: { address: 127.0.0.1:0 }
YAML
  rm -f "$dir/l.json"
  prlimit --nofile=1024:1024 "$bin" run -c "$dir/c.yaml" --listeners-file "$dir/l.json" 2>"$dir/err.$attack.$label" &
  local pid=$!
  for _ in $(seq 1 500); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
  python3 - "$dir/l.json" "$pid" "$secs" "$attack" "$label" <<'PY'
import json, os, socket, sys, threading, time, urllib.request
l, pid, secs, attack, label = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
attacked, other, admin, bridge = l["listeners"]["attacked"], l["listeners"]["other"], l["admin"], l["bridge"]
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def fds():
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
def split(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)
socks, stop = [], time.time() + secs
def connect(addr, n, payload=b""):
    for _ in range(n):
        if time.time() > stop:
            return
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(split(addr))
            if payload:
                s.sendall(payload)
            socks.append(s)
        except OSError:
            s.close()
def trickle():
    while time.time() < stop:
        for s in list(socks):
            try:
                s.send(b"x")
            except OSError:
                pass
        time.sleep(1)
if attack == "fdflood":
    threading.Thread(target=connect, args=(attacked, 3000), daemon=True).start()
elif attack == "bridge":
    threading.Thread(target=connect, args=(bridge, 2000), daemon=True).start()
elif attack == "slowbody":
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    connect(attacked, 200, head)
    threading.Thread(target=trickle, daemon=True).start()
ok = total = live_ok = live_total = 0
peak_rss = peak_fds = 0
while time.time() < stop:
    for url, kind in ((f"http://{other}/", "other"), (f"http://{admin}/live", "live")):
        good = False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                good = r.status == 200
        except Exception:
            pass
        if kind == "other":
            ok += good; total += 1
        else:
            live_ok += good; live_total += 1
    peak_rss, peak_fds = max(peak_rss, rss()), max(peak_fds, fds())
    time.sleep(0.05)
held = -1
try:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=2).read().decode()
    metric = 'outrigger_connections_open{direction="inbound",listener="attacked"}'
    held = sum(int(float(x.split()[-1])) for x in text.splitlines() if x.startswith(metric))
except Exception:
    pass
for s in socks:
    s.close()
print(f"{attack:8} {label:4} peak RSS {peak_rss:6.1f} MiB, peak fds {peak_fds:5}, other listener {ok}/{total} ({100.0*ok/max(total,1):5.1f}%), "
      f"admin /live {live_ok}/{live_total} ({100.0*live_ok/max(live_total,1):5.1f}%), attacked listener holds {held}")
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for attack in fdflood slowbody bridge; do
  run "$attack" old "$old"
  run "$attack" new "$new"
done
