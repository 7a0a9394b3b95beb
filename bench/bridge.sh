#!/usr/bin/env bash
# Bridge state API: get and save through Outrigger's Dapr-compatible bridge (state.redis), over
# the HTTP API and over the gRPC API, vs the same operations straight to Redis, in one run.
#
#   bench/bridge.sh [SECONDS]      (default 10 s per measurement)
#
# Payload: a 1 KiB JSON value (as in Dapr's perf suite). Fixed concurrency: 16 connections.
# Through the bridge: wrk (HTTP/1.1 keep-alive, 1 thread) GET /v1.0/state/bench/k and POST
# /v1.0/state/bench with one item. Direct: redis-benchmark sending the commands the bridge sends
# (HMGET key data version; the bridge's ETag-checking Lua script through EVAL, no ttl). The
# bridge's get also reads PTTL in the same round trip (for ttlExpireTime); direct does not. gRPC: h2load (one
# HTTP/2 connection per client, one call in flight on each) sending GetState / SaveState as
# framed protobuf to /dapr.proto.runtime.v1.Dapr/…; percentiles from its per-request log. CPU pinning: load
# generators on CPU 0, Outrigger and Redis on CPU 1. The sidecar's peak RSS (VmHWM) is read after
# the runs. "added p50" = bridge p50 - direct p50: what an app pays for the HTTP hop.
# Needs: redis-server redis-benchmark wrk h2load taskset curl python3 (Debian: redis-server
# redis-tools wrk nghttp2-client).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-10}
need redis-server redis-benchmark wrk h2load taskset curl python3
# OUTRIGGER_BIN: a binary built already (skips the release build).
build_release

read -r REDIS BRIDGE < <(free_ports 2)
CONN=${CONN:-16}

mkdir "$dir/components"
printf '%s\n' \
  'apiVersion: dapr.io/v1alpha1' \
  'kind: Component' \
  'metadata: { name: bench }' \
  'spec:' \
  '  type: state.redis' \
  '  version: v1' \
  '  metadata:' \
  "    - { name: redisHost, value: \"127.0.0.1:$REDIS\" }" > "$dir/components/redis.yaml"
printf '%s\n' \
  'service: bench' \
  'admin: { address: 127.0.0.1:0 }' \
  'runtime: { worker_threads: 1 }' \
  'log: { level: warn }' \
  'bridge:' \
  "  address: 127.0.0.1:$BRIDGE" \
  "  resources: $dir/components" > "$dir/outrigger.yaml"

start redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log"
wait_port "$REDIS"
start "$bin" run -c "$dir/outrigger.yaml"
sidecar=$!
wait_port "$BRIDGE"

value=$(printf '{"data":"%s"}' "$(head -c 1000 /dev/zero | tr '\0' 'x')")
curl -sf -X POST "http://127.0.0.1:$BRIDGE/v1.0/state/bench" -H 'content-type: application/json' \
  -d "[{\"key\":\"k\",\"value\":$value}]"
printf '%s\n' \
  'wrk.method = "POST"' \
  'wrk.headers["Content-Type"] = "application/json"' \
  "wrk.body = '[{\"key\":\"s\",\"value\":$value}]'" > "$dir/save.lua"

# wrk: prints "rps p50_ms p99_ms"
wrk_run() {
  taskset -c 0 wrk -t1 -c"$CONN" -d1s "$@" >/dev/null # warm up
  taskset -c 0 wrk -t1 -c"$CONN" -d"${secs}s" --latency "$@" | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = $2 }
    /^ +99%/ { p99 = $2 }
    END { printf "%d %.3f %.3f\n", rps, ms(p50), ms(p99) }'
}
# redis-benchmark: prints "rps p50_ms p99_ms"; sized from a short probe to run about SECONDS.
# (The last CSV fields: the test name is the command, which can hold commas.)
rb_run() {
  local probe n
  probe=$(taskset -c 0 redis-benchmark -p "$REDIS" -c "$CONN" -n 20000 --csv "$@" | tail -1 | awk -F, '{ gsub(/"/, ""); print $(NF-6) }')
  n=$(awk -v r="$probe" -v s="$secs" 'BEGIN { printf "%d", r * s }')
  taskset -c 0 redis-benchmark -p "$REDIS" -c "$CONN" -n "$n" --precision 3 --csv "$@" | tail -1 |
    awk -F, '{ gsub(/"/, ""); printf "%d %.3f %.3f\n", $(NF-6), $(NF-3), $(NF-1) }'
}

# gRPC request bodies: a 5-byte gRPC frame header and the protobuf message, encoded by hand
# (GetStateRequest{store_name=1, key=2}; SaveStateRequest{store_name=1, states=2:
# StateItem{key=1, value=2}}), so the script needs no protobuf package.
python3 - "$dir" "$value" <<'PY'
import struct, sys
def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out
def field(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data
def frame(msg):
    return b"\x00" + struct.pack(">I", len(msg)) + msg
d, value = sys.argv[1], sys.argv[2].encode()
open(d + "/get.bin", "wb").write(frame(field(1, b"bench") + field(2, b"k")))
open(d + "/save.bin", "wb").write(frame(field(1, b"bench") + field(2, field(1, b"g") + field(2, value))))
PY
# One call each first: grpc-status 0 in the trailers, or the figures would measure errors.
for m in GetState:get SaveState:save; do
  curl -s --http2-prior-knowledge -v -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$dir/${m#*:}.bin" "http://127.0.0.1:$BRIDGE/dapr.proto.runtime.v1.Dapr/${m%%:*}" -o /dev/null 2>&1 |
    grep -q 'grpc-status: 0' || { echo "gRPC ${m%%:*} failed"; exit 1; }
done
# h2load: prints "rps p50_ms p99_ms" (from the per-request log: start, status, elapsed µs).
# h2_run METHOD BODY: a gRPC call; h2_url PATH: the HTTP API's GET over h2c (the same client
# and protocol as gRPC, so the two front doors compare without wrk/h2load differences).
h2_run() {
  local method=$1 body=$2
  h2_load "/dapr.proto.runtime.v1.Dapr/$method" -d "$body" -H 'content-type: application/grpc' -H 'te: trailers'
}
h2_url() { h2_load "$1"; }
h2_load() {
  local path=$1; shift
  local args=(-c "$CONN" -m 1 -t 1 "$@")
  taskset -c 0 h2load "${args[@]}" -D 1 "http://127.0.0.1:$BRIDGE$path" >/dev/null # warm up
  local rps
  rps=$(taskset -c 0 h2load "${args[@]}" -D "$secs" --log-file="$dir/h2.log" \
    "http://127.0.0.1:$BRIDGE$path" | awk '/^finished in/ { print int($4) }')
  awk '{ print $3 }' "$dir/h2.log" | sort -n | awk -v rps="$rps" '
    { v[NR] = $1 }
    END { printf "%d %.3f %.3f\n", rps, v[int(NR * 0.5)] / 1000, v[int(NR * 0.99)] / 1000 }'
}

# The bridge's own script, so "direct" does the same work in Redis.
script=$(sed -n '/^const APPLY_SCRIPT: &str = r#"/,/^"#;/p' src/bridge/state.rs | sed '1d;$d')
read -r get_b_rps get_b_p50 get_b_p99 < <(wrk_run "http://127.0.0.1:$BRIDGE/v1.0/state/bench/k")
read -r get_d_rps get_d_p50 get_d_p99 < <(rb_run HMGET "bench||k" data version)
read -r save_b_rps save_b_p50 save_b_p99 < <(wrk_run -s "$dir/save.lua" "http://127.0.0.1:$BRIDGE/v1.0/state/bench")
read -r save_d_rps save_d_p50 save_d_p99 < <(rb_run EVAL "$script" 1 "bench||s" 1 u "" "$value" "")
read -r get_g_rps get_g_p50 get_g_p99 < <(h2_run GetState "$dir/get.bin")
read -r get_h_rps get_h_p50 get_h_p99 < <(h2_url "/v1.0/state/bench/k")
read -r save_g_rps save_g_p50 save_g_p99 < <(h2_run SaveState "$dir/save.bin")
rss=$(awk '/VmHWM/ {print $2}' "/proc/$sidecar/status")

added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f us", (a - b) * 1000 }'; }
printf '\n%-22s %10s %9s %9s %12s\n' "state, $CONN connections" "req/s" "p50 ms" "p99 ms" "added p50"
printf '%-22s %10s %9s %9s\n' "get: Redis direct" "$get_d_rps" "$get_d_p50" "$get_d_p99"
printf '%-22s %10s %9s %9s %12s\n' "get: via bridge wrk" "$get_b_rps" "$get_b_p50" "$get_b_p99" "$(added "$get_b_p50" "$get_d_p50")"
printf '%-22s %10s %9s %9s %12s\n' "get: via bridge h2c" "$get_h_rps" "$get_h_p50" "$get_h_p99" "$(added "$get_h_p50" "$get_d_p50")"
printf '%-22s %10s %9s %9s %12s\n' "get: via bridge gRPC" "$get_g_rps" "$get_g_p50" "$get_g_p99" "$(added "$get_g_p50" "$get_d_p50")"
printf '%-22s %10s %9s %9s\n' "save: Redis direct" "$save_d_rps" "$save_d_p50" "$save_d_p99"
printf '%-22s %10s %9s %9s %12s\n' "save: via bridge wrk" "$save_b_rps" "$save_b_p50" "$save_b_p99" "$(added "$save_b_p50" "$save_d_p50")"
printf '%-22s %10s %9s %9s %12s\n' "save: via bridge gRPC" "$save_g_rps" "$save_g_p50" "$save_g_p99" "$(added "$save_g_p50" "$save_d_p50")"
awk -v k="$rss" 'BEGIN { printf "sidecar peak RSS: %.1f MiB\n", k / 1024 }'
