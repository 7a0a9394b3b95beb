#!/usr/bin/env bash
# Clients that read nothing (issue 19, item 3), old build vs new in one run: N connections each
# ask for a 16 MiB response through an inbound listener and never read it, while a well-behaved
# client keeps calling another listener of the same sidecar. Reports, per binary: peak RSS and
# open descriptors during the attack, the same once `idle_timeout` (2 s here) has passed, how
# many attack connections the sidecar still holds, and the well-behaved client's success ratio.
# Bounded: the attack lasts SECONDS, then every socket is closed.
#
#   bench/stall.sh OLD_BINARY NEW_BINARY [CONNECTIONS] [SECONDS]   (default 300, 12)
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); conns=${3:-300}; secs=${4:-12}
. "$(dirname "$0")/lib.sh"
need nginx python3 curl taskset
read -r UP < <(free_ports 1)
head -c 16777216 /dev/zero | tr '\0' 'x' > "$dir/big"
BENCH_CPU=0-1 start nginx -c "$(nginx_upstream $UP "location /big { alias $dir/big; }
           location / { return 200 \"ok\\n\"; }" 'sendfile on;')"

run() {  # name binary
  local name=$1 bin=$2
  cat > "$dir/$name.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
app: { address: 127.0.0.1:$UP, probe: { enabled: false } }
listeners:
  - { name: attacked, address: 127.0.0.1:0, limits: { idle_timeout: 2s } }
  - { name: other, address: 127.0.0.1:0 }
YAML
  rm -f "$dir/l.json"
  "$bin" run -c "$dir/$name.yaml" --listeners-file "$dir/l.json" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 500); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
  python3 - "$dir/l.json" "$pid" "$conns" "$secs" "$name" <<'PY'
import json, os, socket, sys, threading, time, urllib.request
listeners, pid, conns, secs, name = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
attacked, other = listeners["listeners"]["attacked"], listeners["listeners"]["other"]
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))
def held():  # attack connections the sidecar still has open, by its own gauge
    text = urllib.request.urlopen(f"http://{listeners['admin']}/metrics", timeout=2).read().decode()
    for line in text.splitlines():
        if line.startswith('outrigger_connections_open{direction="inbound",listener="attacked"}'):
            return int(float(line.split()[-1]))
    return -1
host, port = attacked.rsplit(":", 1)
socks = []
for _ in range(conns):
    s = socket.socket()
    # Small before connecting, so the window stays small: the response cannot hide in it.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    socks.append(s)
ok = total = 0
peak_rss = peak_fds = 0
stop = time.time() + secs
while time.time() < stop:
    try:
        with urllib.request.urlopen(f"http://{other}/", timeout=2) as r:
            ok += r.status == 200
    except Exception:
        pass
    total += 1
    peak_rss, peak_fds = max(peak_rss, rss()), max(peak_fds, fds())
    time.sleep(0.02)
end_rss, end_fds, end_held = rss(), fds(), held()
for s in socks:
    s.close()
print(f"{name:4} peak RSS {peak_rss:7.1f} MiB, peak fds {peak_fds:5}; after {secs:.0f} s: RSS {end_rss:7.1f} MiB, fds {end_fds:5}, "
      f"attack connections held {end_held:4}/{conns}; other listener {ok}/{total} ok ({100.0 * ok / max(total, 1):.1f}%)")
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
run old "$old"
run new "$new"
