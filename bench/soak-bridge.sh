#!/usr/bin/env bash
# Soak, part two: the attacks of issue 19 items 1, 2, 5, 6 and 7 against one binary, each on a
# fresh sidecar, bounded in time and count, loopback only (bench/soak.sh has items 3 and 4).
# While an attack runs a well-behaved client calls another proxy listener and admin `/live`
# (a new connection each time, 2 s timeout, every 50 ms); reported per attack: whether the
# sidecar survived, peak RSS, peak open descriptors, both success ratios, and the attack's own
# figure. The sidecar runs under `prlimit --nofile=1024`.
#
#   celdeep   the app's /dapr/subscribe answers a `match` nested 10,000 `(` deep (item 1: a stack
#             overflow aborted the process); `outrigger check` of the same rule in a Subscription
#             file (exit 78 expected, 134 was the abort)
#   pubsub    1 MB messages published as fast as possible to in-memory pub/sub whose subscriber
#             never answers (item 2: RSS grew ~300 MB/s to 3 GB); the figure is peak RSS
#   redis     state calls against a state.redis whose server is down, then one with a wrong
#             password (item 5: each waited 9.44 s before its 500); the figure is the slowest call
#   secret    a config with `bridge.api_token: 4242424242` and a mistake (item 6: the number was
#             echoed in errors and /config); the figure is where the secret was found
#   origin    cross-origin POSTs to admin /shutdown and /reload and the bridge's /v1.0/shutdown,
#             and GET /config with a foreign Host (item 7); the figure is their statuses
#
#   bench/soak-bridge.sh BINARY [SECONDS]     (default 10)
set -euo pipefail
bin=$(realpath "$1"); secs=${2:-10}
. "$(dirname "$0")/lib.sh"
need nginx python3 prlimit redis-cli
chmod 755 "$dir"  # nginx workers read subscribe.json
read -r UP HOLE DEAD < <(free_ports 3)
deep=$(python3 -c 'print("(" * 10000 + "event.type == \"a\"" + ")" * 10000)')
# The app: nginx answers everything with 200, /dapr/subscribe with the deep rule, and hands
# deliveries to a socket that accepts and never answers (a subscriber that does not keep up).
cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 4096; }
http { access_log off; client_max_body_size 16m;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
    location = /dapr/subscribe { default_type application/json; alias $dir/subscribe.json; }
    location /slow { proxy_pass http://127.0.0.1:$HOLE; proxy_read_timeout 3600s; }
    location / { return 200 "ok\n"; } } }
CONF
# What the app subscribes to (read by nginx on each request): per attack, set by run().
printf '[{"pubsubname":"pubsub","topic":"deep","routes":{"rules":[{"match":"%s","path":"/a"}],"default":"/d"}}]' \
  "$(printf '%s' "$deep" | sed 's/"/\\"/g')" > "$dir/subscribe.deep.json"
printf '[{"pubsubname":"pubsub","topic":"slow","route":"/slow"}]' > "$dir/subscribe.slow.json"
nginx -c "$dir/up.conf" & pids+=($!)
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $HOLE)); s.listen(4096)
held = []
while True:
    c, _ = s.accept(); held.append(c)
" & pids+=($!)

mkdir -p "$dir/res-redis-down" "$dir/res-redis-pw"
for d in down pw; do
  if [ $d = down ]; then host="127.0.0.1:$DEAD"; pw=""; else host="127.0.0.1:6379"; pw="  - { name: redisPassword, value: wrong-password }"; fi
  cat > "$dir/res-redis-$d/state.yaml" <<YAML
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: { name: statestore }
spec:
  type: state.redis
  version: v1
  metadata:
  - { name: redisHost, value: "$host" }
$pw
YAML
done

# outrigger check of the deep rule in a Subscription file.
mkdir -p "$dir/res-deep"
cat > "$dir/res-deep/sub.yaml" <<YAML
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: { name: deep }
spec:
  pubsubname: pubsub
  topic: deep
  routes:
    rules:
    - { match: '$deep', path: /a }
    default: /d
YAML
printf 'bridge: { address: 127.0.0.1:0, resources: %s }\n' "$dir/res-deep" > "$dir/check.yaml"
set +e; "$bin" check -c "$dir/check.yaml" >/dev/null 2>"$dir/check.err"; code=$?; set -e
echo "celdeep  outrigger check of a 10,000-deep match: exit $code ($(grep -c 'nested\|deep' "$dir/check.err" || true) line(s) about the depth)"

run() {  # attack
  local attack=$1 resources=""
  case $attack in redis) resources="resources: $dir/res-redis-down" ;; esac
  case $attack in pubsub) cp "$dir/subscribe.slow.json" "$dir/subscribe.json" ;;
                  *) cp "$dir/subscribe.deep.json" "$dir/subscribe.json" ;; esac
  cat > "$dir/c.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
app: { address: 127.0.0.1:$UP, probe: { enabled: false } }
listeners:
  - { name: other, address: 127.0.0.1:0 }
bridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0 $( [ -n "$resources" ] && echo ", $resources" ) }
YAML
  rm -f "$dir/l.json"
  prlimit --nofile=1024:1024 "$bin" run -c "$dir/c.yaml" --listeners-file "$dir/l.json" 2>"$dir/err.$attack" &
  local pid=$!
  for _ in $(seq 1 1000); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
  python3 - "$dir/l.json" "$pid" "$secs" "$attack" "$dir" <<'PY'
import json, os, socket, sys, threading, time, urllib.request
l, pid, secs, attack, d = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
other, admin, bridge = l["listeners"]["other"], l["admin"], l["bridge"]
def alive():
    try:
        st = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0]
        return st not in ("Z", "X")
    except OSError:
        return False
def rss():
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0
def fds():
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
def call(method, url, body=None, headers=None, timeout=15):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.time() - t
    except urllib.error.HTTPError as e:
        return e.code, time.time() - t
    except Exception as e:
        return type(e).__name__, time.time() - t
stop = time.time() + secs
figure = ""
def attacker():
    global figure
    if attack == "celdeep":
        # The subscriptions were read at start; the deep one must fail alone. Publish to both.
        n = 0
        while time.time() < stop:
            call("POST", f"http://{bridge}/v1.0/publish/pubsub/deep", b'{"a":1}', {"content-type": "application/json"})
            n += 1
            time.sleep(0.05)
        figure = f"{n} publishes to the deep topic"
    elif attack == "pubsub":
        body = b"x" * 1_000_000
        n = ok = 0
        while time.time() < stop:
            s, _ = call("POST", f"http://{bridge}/v1.0/publish/pubsub/slow", body, {"content-type": "application/octet-stream"}, 5)
            n += 1; ok += s == 204
        figure = f"{n} × 1 MB published ({ok} accepted, the rest refused)"
    elif attack == "redis":
        worst = {}
        for label in ("down",):
            n = 0
            while time.time() < stop:
                s, t = call("GET", f"http://{bridge}/v1.0/state/statestore/k")
                worst[label] = max(worst.get(label, (0, 0)), (t, s)); n += 1
        figure = ", ".join(f"Redis {k}: {n} calls, slowest {v[0]*1000:.0f} ms (status {v[1]})" for k, v in worst.items())
    elif attack == "origin":
        results = []
        for name, method, url, headers in (
            ("admin POST /reload", "POST", f"http://{admin}/reload", {"origin": "http://evil.example", "content-type": "text/plain"}),
            ("bridge POST /v1.0/shutdown", "POST", f"http://{bridge}/v1.0/shutdown", {"origin": "http://evil.example", "content-type": "text/plain"}),
            ("admin GET /config, Host evil", "GET", f"http://{admin}/config", {"host": "evil.example"}),
            ("admin POST /shutdown", "POST", f"http://{admin}/shutdown", {"origin": "http://evil.example", "content-type": "text/plain"}),
        ):
            s, _ = call(method, url, b"x" if method == "POST" else None, headers)
            results.append(f"{name} {s}")
        figure = "; ".join(results)
threading.Thread(target=attacker, daemon=True).start()
ok = total = live_ok = live_total = 0
peak_rss = peak_fds = 0
survived = True
while time.time() < stop:
    if not alive():
        survived = False
        break
    for url, kind in ((f"http://{other}/", "other"), (f"http://{admin}/live", "live")):
        s, _ = call("GET", url, timeout=2)
        if kind == "other":
            ok += s == 200; total += 1
        else:
            live_ok += s == 200; live_total += 1
    peak_rss, peak_fds = max(peak_rss, rss()), max(peak_fds, fds())
    time.sleep(0.05)
time.sleep(0.5)
survived = survived and alive()
print(f"{attack:8} {'survived' if survived else 'DIED':8} peak RSS {peak_rss:6.1f} MiB, peak fds {peak_fds:4}, other listener {ok}/{total} ({100.0*ok/max(total,1):5.1f}%), "
      f"admin /live {live_ok}/{live_total} ({100.0*live_ok/max(live_total,1):5.1f}%); {figure}")
PY
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  cp "$dir/err.$attack" "${SOAK_LOGS:-/tmp}/soak-bridge.$attack.log"
  if [ "$attack" = celdeep ]; then
    echo "celdeep  the sidecar's log on the deep rule: $(grep -m1 'subscription ignored' "$dir/err.$attack" | sed -E 's/\(+/(…/; s/\)+/)…/' | cut -c1-220 || true)"
  fi
}
for attack in celdeep pubsub redis origin; do
  run "$attack"
done

# A wrong Redis password: the first state call's time.
cat > "$dir/c.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
bridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0, resources: $dir/res-redis-pw }
YAML
rm -f "$dir/l.json"
"$bin" run -c "$dir/c.yaml" --listeners-file "$dir/l.json" 2>"$dir/err.pw" & pid=$!
for _ in $(seq 1 1000); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
b=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['bridge'])" "$dir/l.json")
t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' "http://$b/v1.0/state/statestore/k")
echo "redis    wrong password: first state call $t s"
kill $pid; wait $pid 2>/dev/null || true

# Item 6: a secret written as a number, with a mistake elsewhere in the file.
printf 'admin: { address: 127.0.0.1:0 }\nbridge: { address: 127.0.0.1:0, api_token: 4242424242 }\nlisteners: [ { name: a, address: nowhere } ]\n' > "$dir/s.yaml"
set +e; "$bin" check -c "$dir/s.yaml" >"$dir/s.out" 2>&1; code=$?; set -e
echo "secret   bad config: exit $code; the secret appears $(grep -c 4242424242 "$dir/s.out" || true) time(s) in its errors"
printf 'admin: { address: 127.0.0.1:0 }\nbridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0, api_token: "4242424242" }\n' > "$dir/s.yaml"
rm -f "$dir/l.json"
"$bin" run -c "$dir/s.yaml" --listeners-file "$dir/l.json" 2>"$dir/s.err" & pid=$!
for _ in $(seq 1 1000); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
a=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['admin'])" "$dir/l.json")
# A reload with a mistake: the errors land in /config's last_reload.
printf 'admin: { address: %s }\nbridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0, api_token: 4242424242 }\nlisteners: [ { name: a, address: nowhere } ]\n' "$a" > "$dir/s.yaml"
curl -s -X POST "http://$a/reload" >/dev/null || true
n=$(curl -s "http://$a/config" | grep -c 4242424242 || true)
echo "secret   running: the secret appears in GET /config $n time(s), in stderr $(grep -c 4242424242 "$dir/s.err" || true) time(s)"
kill $pid; wait $pid 2>/dev/null || true
