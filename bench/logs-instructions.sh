#!/usr/bin/env bash
# Instructions the log agent spends on file → file (NDJSON, json parse + two fields, checkpoint),
# counted by callgrind: repeatable to a fraction of a percent where wall-clock MiB/s on this
# shared machine varies by tens of percent. For A/B between builds:
#
#   bench/logs-instructions.sh BINARY [BINARY…]      (default target/release/outrigger)
#   LINES=40000 bench/logs-instructions.sh /tmp/outrigger-old target/release/outrigger
#
# The input is the same generator as bench/logs.sh (realistic JSON lines, ~356 bytes); each
# binary runs under valgrind until the last line is in the output file, then gets SIGTERM.
#
#   bench/logs-instructions.sh otlp      the OTLP sink's encoder alone, the Value-based one it
#                                        replaced against the scanned one, A/B in one build
#
# `otlp` builds the library's tests in release (thin LTO: a test binary, not the shipped one)
# and counts `otlp_encoder_instructions` under callgrind three times: reading the input only
# (the baseline), the old encoder, the new one; per line is (run - baseline) / lines.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null
n=${LINES:-40000}
dir=$(mktemp -d /tmp/logs-instructions.XXXXXX); trap 'rm -rf "$dir"' EXIT
python3 - "$dir/in.log" "$n" <<'PY'
import json, random, sys
random.seed(7)
paths = ["/api/v1/orders/%d", "/api/v1/users/%d/cart", "/healthz", "/api/v1/payments/%d/capture"]
agents = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", "okhttp/4.12.0", "curl/8.4.0", "Go-http-client/1.1"]
levels = ["info"] * 8 + ["warn", "error"]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        p = random.choice(paths)
        f.write(json.dumps({
            "time": "2026-12-06T08:%02d:%02d.%06dZ" % (i // 3600 % 60, i // 60 % 60, random.randrange(10**6)),
            "level": random.choice(levels), "logger": "http.access", "msg": "request completed",
            "method": random.choice(["GET", "GET", "POST", "PUT"]),
            "path": p % random.randrange(100000) if "%d" in p else p,
            "status": random.choice([200] * 9 + [404, 500]), "duration_ms": round(random.expovariate(1 / 20), 2),
            "bytes": random.randrange(100, 50000), "user_id": "u-%d" % random.randrange(10**6),
            "trace_id": "%032x" % random.getrandbits(128), "span_id": "%016x" % random.getrandbits(64),
            "peer": "10.0.%d.%d:%d" % (random.randrange(256), random.randrange(256), random.randrange(1024, 65536)),
            "user_agent": random.choice(agents)}, separators=(",", ":")) + "\n")
    f.write('{"time":"2026-12-06T09:00:00.000000Z","level":"info","msg":"bench-end"}\n')
PY
if [ "${1:-}" = otlp ]; then
  export CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
  test_bin=$(flock /tmp/outrigger-cargo.lock cargo test --release --lib --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "outrigger" and m["profile"]["test"]:
        print(m["executable"])' | tail -1)
  [ -n "$test_bin" ] || { echo "the release test binary did not build (cargo's errors above)" >&2; exit 1; }
  declare -A cost
  for enc in none old new; do
    OTLP_BENCH_FILE=$dir/in.log OTLP_BENCH_ENCODER=$enc valgrind --tool=callgrind --callgrind-out-file="$dir/cg.$enc" \
      "$test_bin" --ignored --exact logs::otlp::tests::otlp_encoder_instructions --test-threads 1 >/dev/null 2>"$dir/err.$enc"
    cost[$enc]=$(callgrind_annotate "$dir/cg.$enc" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  done
  for enc in old new; do
    printf 'otlp encoder %s: %.0f instructions per line (%s lines; baseline %s)\n' "$enc" \
      "$(echo "(${cost[$enc]} - ${cost[none]}) / ($n + 1)" | bc -l)" "$((n + 1))" "${cost[none]}"
  done
  exit 0
fi
for bin in "${@:-target/release/outrigger}"; do
  st=$dir/run; rm -rf "$st"; mkdir -p "$st"
  printf 'logs:\n  sources:\n    - files: %s\n      format: json\n  fields: { cluster: eu-1, env: bench }\n  checkpoint: %s/checkpoint.json\n  sinks:\n    - file: %s/out.log\n' \
    "$dir/in.log" "$st" "$st" > "$st/conf.yaml"
  valgrind --tool=callgrind --callgrind-out-file="$st/cg.out" "$bin" run -c "$st/conf.yaml" >"$st/stdout" 2>"$st/stderr" &
  p=$!
  for _ in $(seq 3000); do grep -q bench-end "$st/out.log" 2>/dev/null && break; sleep 0.2; done
  kill -TERM "$p"; wait "$p" || true
  total=$(callgrind_annotate "$st/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  printf '%s: %s instructions, %.0f per line (%s lines)\n' "$bin" "$total" "$(echo "$total / ($n + 1)" | bc -l)" "$((n + 1))"
done
