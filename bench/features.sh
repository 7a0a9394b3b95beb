#!/usr/bin/env bash
# What building only the proxy saves: binary size and idle RSS of the full release build
# (default features: proxy + bridge) against `--no-default-features --features proxy`, in one
# run. Idle = admin plus one inbound HTTP listener, RSS right after /ready and after 1,000 admin
# calls (as bench/idle-rss.sh).
#
#   bench/features.sh                     builds both (release, fat LTO: several minutes each)
#   FULL=path PROXY=path bench/features.sh   measures binaries built already
#   OLD=path ...                           adds a line for another full build (a commit before)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FULL:-}" ]; then
  cargo build --release -q
  FULL=target/release/outrigger
fi
if [ -z "${PROXY:-}" ]; then
  CARGO_TARGET_DIR=target/proxy-only cargo build --release -q --no-default-features --features proxy
  PROXY=target/proxy-only/release/outrigger
fi
dir=$(mktemp -d); pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
printf 'admin: { address: 127.0.0.1:0 }\napp: { address: 127.0.0.1:9, probe: { enabled: false } }\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\n' > "$dir/c.yaml"

measure() {  # name binary
  local name=$1 bin=$2
  rm -f "$dir/l.json"
  "$bin" run -c "$dir/c.yaml" --listeners-file "$dir/l.json" 2>"$dir/stderr" &
  pid=$!
  for _ in $(seq 1 500); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
  local admin
  admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$dir/l.json")
  until curl -fs "http://$admin/ready" >/dev/null; do sleep 0.01; done
  local start after size
  start=$(awk '/VmRSS/ {printf "%.2f", $2/1024}' "/proc/$pid/status")
  for _ in $(seq 1 500); do curl -s "http://$admin/ready" >/dev/null; curl -s "http://$admin/metrics" >/dev/null; done
  after=$(awk '/VmRSS/ {printf "%.2f", $2/1024}' "/proc/$pid/status")
  size=$(stat -c %s "$bin" | awk '{printf "%.2f", $1/1048576}')
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  printf '%-12s %-28s binary %6s MiB   idle RSS %6s MiB   after 1,000 admin calls %6s MiB\n' \
    "$name" "($("$bin" version | sed 's/.*(modules: //; s/)//'))" "$size" "$start" "$after"
  echo "$size $start $after" > "$dir/$name"
}
if [ -n "${OLD:-}" ]; then measure old "$OLD"; fi
measure full "$FULL"
measure proxy-only "$PROXY"
if [ -n "${OLD:-}" ]; then
  read -r os or oa < "$dir/old"; read -r fs fr fa < "$dir/full"
  echo "full / old: binary $(echo "scale=3; $fs / $os" | bc)×, idle RSS $(echo "scale=3; $fr / $or" | bc)×, after admin calls $(echo "scale=3; $fa / $oa" | bc)×"
fi
read -r fs fr fa < "$dir/full"; read -r ps pr pa < "$dir/proxy-only"
echo "proxy-only / full: binary $(echo "scale=2; $ps / $fs" | bc)×, idle RSS $(echo "scale=2; $pr / $fr" | bc)×, after admin calls $(echo "scale=2; $pa / $fa" | bc)×"
