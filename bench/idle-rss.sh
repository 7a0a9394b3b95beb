#!/usr/bin/env bash
# Idle memory of `outrigger run` on an empty config (admin only), release build.
# Reports RSS right after start, and after 1,000 admin requests (/ready and /metrics), each
# split into anonymous memory and the binary's file-backed pages.
# Usage: bench/idle-rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
: > "$dir/empty.yaml"
./target/release/outrigger run -c "$dir/empty.yaml" --set admin.address=127.0.0.1:0 \
  --listeners-file "$dir/l.json" 2>"$dir/stderr" &
pid=$!
for _ in $(seq 1 500); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$dir/l.json")
until curl -fs "http://$admin/ready" >/dev/null; do sleep 0.01; done
# VmRSS counts the binary's own mapped file pages (text, rodata: page cache, shared and
# reclaimable) next to anonymous memory (heap, stacks): print both parts too.
rss() {
  awk '/VmRSS/ {t=$2} /RssAnon/ {a=$2} /RssFile/ {f=$2}
       END {printf "%.2f MiB (anonymous %.2f, file-backed %.2f)", t/1024, a/1024, f/1024}' "/proc/$pid/status"
}
echo "outrigger $(./target/release/outrigger version | cut -d' ' -f2), pid $pid"
echo "idle RSS after start:              $(rss)"
for _ in $(seq 1 500); do curl -s "http://$admin/ready" >/dev/null; curl -s "http://$admin/metrics" >/dev/null; done
echo "idle RSS after 1,000 admin calls:  $(rss)"
echo "threads: $(awk '/Threads/ {print $2}' "/proc/$pid/status")"
