#!/usr/bin/env bash
# Log agent throughput and memory: Outrigger next to rsyslog and syslog-ng, in one run.
#
#   bench/logs.sh [MIB] [ROUNDS]      (default 1024 MiB of JSON lines, 1 round)
#   AGENTS="outrigger syslog-ng" NO_BUILD=1 bench/logs.sh 64     (a subset, the build as it is)
#   OLD_BIN=/tmp/old/outrigger bench/logs.sh                       (an older build beside, as outrigger-old)
#
# Each agent reads one file of realistic JSON log lines (~330 bytes, written before the agent
# starts, so it is read from the page cache), parses each line as JSON, adds two fields and
# ships it:
#   http   to a local receiver that counts lines and bytes (bench/logs-receiver.py): Outrigger
#          and syslog-ng POST NDJSON batches; rsyslog has no HTTP output in Debian (omhttp is not
#          built there), so it sends newline-delimited TCP (omfwd) to the same receiver
#   file   to a file (Outrigger fdatasyncs each acknowledged batch; the peers do not sync)
# Reported per run: seconds from the agent's start to the last line at the receiver / in the
# file, MiB/s and lines/s of input, the agent's peak RSS (VmHWM) and CPU seconds (user+system),
# and the receiver's CPU seconds (to show it was not the bottleneck). Next to them: the raw
# read limit (`cat file > /dev/null`). Then idle RSS: Outrigger admin-only vs one file source.
#
# Peers: rsyslog (apt-get install rsyslog) and syslog-ng; the two conflict as Debian packages
# (both provide system-log-daemon), so syslog-ng-core and syslog-ng-mod-http are unpacked with
# `apt-get download` + `dpkg -x` into $SYSLOG_NG_ROOT (default /opt/peers/syslog-ng) and run from
# there. Fluent Bit and Vector are not in Debian's archive, so they are not measured here.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
mib=${1:-1024}; rounds=${2:-1}
SNG=${SYSLOG_NG_ROOT:-/opt/peers/syslog-ng}
read -r HTTP_PORT TCP_PORT ADMIN_PORT < <(free_ports 3)
# A peer that cannot be installed or started here is reported as such ("not measured: …") and
# the rest of the run goes on. (`apt-get install syslog-ng` itself fails on some machines: held
# broken packages, syslog-ng-core's version against the meta package's; the unpacking below
# needs neither.)
missing=()   # "agent: reason"
if ! command -v rsyslogd >/dev/null; then
  echo "installing rsyslog"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsyslog >/dev/null 2>&1 \
    || missing+=("rsyslog: apt-get install rsyslog failed")
fi
if [ ! -x "$SNG/usr/sbin/syslog-ng" ]; then
  echo "unpacking syslog-ng into $SNG"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q libivykis0 libnet1 libwrap0 libglib2.0-0 libpcre3 >/dev/null 2>&1 \
         && mkdir -p "$SNG.dl" && (cd "$SNG.dl" && apt-get download -q syslog-ng-core syslog-ng-mod-http >/dev/null 2>&1) \
         && (for d in "$SNG".dl/*.deb; do dpkg -x "$d" "$SNG" || exit 1; done); }; then
    missing+=("syslog-ng: syslog-ng-core/syslog-ng-mod-http could not be downloaded and unpacked")
  fi
fi
if [ -x "$SNG/usr/sbin/syslog-ng" ] && ! LD_LIBRARY_PATH=$SNG/usr/lib/syslog-ng "$SNG/usr/sbin/syslog-ng" --version >/dev/null 2>&1; then
  missing+=("syslog-ng: the unpacked binary does not start ($(LD_LIBRARY_PATH=$SNG/usr/lib/syslog-ng "$SNG/usr/sbin/syslog-ng" --version 2>&1 | head -1))")
fi
unavailable() { # $1 agent → its reason, if it cannot run here
  local m; for m in "${missing[@]}"; do [ "${m%%:*}" = "$1" ] && { echo "${m#*: }"; return 0; }; done; return 1
}
if [ -n "${NO_BUILD:-}" ]; then bin=${OUTRIGGER_BIN:-$PWD/target/release/outrigger}; else build_release; fi

# ---- input: realistic JSON lines, a generated block repeated, and a last line to look for.
python3 - "$dir/in.log" "$mib" <<'PY'
import json, random, sys
random.seed(7)
paths = ["/api/v1/orders/%d", "/api/v1/users/%d/cart", "/healthz", "/api/v1/payments/%d/capture"]
agents = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", "okhttp/4.12.0", "curl/8.4.0", "Go-http-client/1.1"]
levels = ["info"] * 8 + ["warn", "error"]
lines = []
for i in range(20000):
    p = random.choice(paths)
    lines.append(json.dumps({
        "time": "2026-12-06T08:%02d:%02d.%06dZ" % (i // 3600 % 60, i // 60 % 60, random.randrange(10**6)),
        "level": random.choice(levels), "logger": "http.access", "msg": "request completed",
        "method": random.choice(["GET", "GET", "POST", "PUT"]),
        "path": p % random.randrange(100000) if "%d" in p else p,
        "status": random.choice([200] * 9 + [404, 500]), "duration_ms": round(random.expovariate(1 / 20), 2),
        "bytes": random.randrange(100, 50000), "user_id": "u-%d" % random.randrange(10**6),
        "trace_id": "%032x" % random.getrandbits(128), "span_id": "%016x" % random.getrandbits(64),
        "peer": "10.0.%d.%d:%d" % (random.randrange(256), random.randrange(256), random.randrange(1024, 65536)),
        "user_agent": random.choice(agents)}, separators=(",", ":")))
block = ("\n".join(lines) + "\n").encode()
want = int(sys.argv[2]) << 20
with open(sys.argv[1], "wb") as f:
    n = 0
    while n + len(block) <= want:
        f.write(block); n += len(block)
    f.write(block[: block.rfind(b"\n", 0, want - n) + 1] if want > n else b"")
    f.write(b'{"time":"2026-12-06T09:00:00.000000Z","level":"info","msg":"bench-end"}\n')
PY
in=$dir/in.log
size=$(stat -c %s "$in"); lines=$(wc -l < "$in")
cat "$in" > /dev/null
t0=$(date +%s.%N); cat "$in" > /dev/null; t1=$(date +%s.%N)
printf 'input: %s lines, %.1f MiB (avg %d B/line); raw read (cat > /dev/null, page cache): %.0f MiB/s\n' \
  "$lines" "$(echo "$size / 1048576" | bc -l)" $(( size / lines )) "$(echo "$size / 1048576 / ($t1 - $t0)" | bc -l)"

# ---- configurations
mkconf() { # $1 agent, $2 sink, $3 state dir
  local out=$3/out.log
  case $1 in
  outrigger|outrigger-old)
    printf 'admin: { address: 127.0.0.1:%s }\nlogs:\n  sources:\n    - files: %s\n      format: json\n' "$ADMIN_PORT" "$in"
    printf '  fields: { cluster: eu-1, env: bench }\n  checkpoint: %s/checkpoint.json\n  sinks:\n' "$3"
    if [ "$2" = http ]; then printf '    - http: http://127.0.0.1:%s/ingest\n' "$HTTP_PORT"
    else printf '    - file: %s\n' "$out"; fi ;;
  rsyslog)
    cat <<CONF
global(workDirectory="$3" maxMessageSize="64k")
module(load="imfile")
module(load="mmjsonparse")
main_queue(queue.size="100000")
template(name="j" type="list") { property(name="\$!all-json-plain") constant(value="\\n") }
input(type="imfile" file="$in" tag="app" ruleset="r")
ruleset(name="r") {
  action(type="mmjsonparse" cookie="")
  set \$!cluster = "eu-1";
  set \$!env = "bench";
CONF
    if [ "$2" = http ]; then
      printf '  action(type="omfwd" target="127.0.0.1" port="%s" protocol="tcp" template="j" TCP_Framing="traditional")\n}\n' "$TCP_PORT"
    else printf '  action(type="omfile" file="%s" template="j")\n}\n' "$out"; fi ;;
  syslog-ng)
    local body='$(format-json --scope none --key .json.* --shift 6 --pair cluster=eu-1 --pair env=bench)'
    cat <<CONF
@version: 3.38
options { log-msg-size(65536); stats-freq(0); };
source s { file("$in" flags(no-parse) follow-freq(1) log-iw-size(10000) log-fetch-limit(1000)); };
parser p { json-parser(prefix(".json.")); };
CONF
    if [ "$2" = http ]; then
      printf 'destination d { http(url("http://127.0.0.1:%s/ingest") method("POST") headers("Content-Type: application/x-ndjson") batch-lines(1000) batch-bytes(1048576) batch-timeout(1000) body("%s") delimiter("\\n") body-suffix("\\n")); };\n' "$HTTP_PORT" "$body"
    else printf 'destination d { file("%s" template("%s\\n")); };\n' "$out" "$body"; fi
    # flow-control: without it syslog-ng drops what its destination queue cannot hold (it lost
    # 20,848 of 3,009,939 lines to the HTTP receiver in a first run of this script).
    echo 'log { source(s); parser(p); destination(d); flags(flow-control); };' ;;
  esac
}
start_agent() { # $1 agent, $2 config, $3 state dir → pid in $apid (not pinned, unlike lib.sh's start)
  case $1 in
  outrigger) "$bin" run -c "$2" >"$3/stdout" 2>"$3/stderr" & apid=$! ;;
  outrigger-old) "$OLD_BIN" run -c "$2" >"$3/stdout" 2>"$3/stderr" & apid=$! ;;
  rsyslog) rsyslogd -n -f "$2" -i "$3/pid" >"$3/stdout" 2>"$3/stderr" & apid=$! ;;
  syslog-ng) LD_LIBRARY_PATH=$SNG/usr/lib/syslog-ng "$SNG/usr/sbin/syslog-ng" -F --no-caps -f "$2" \
       --module-path "$SNG/usr/lib/syslog-ng/3.38" --persist-file "$3/persist" --pidfile "$3/pid" \
       --control "$3/ctl" >"$3/stdout" 2>"$3/stderr" & apid=$! ;;
  esac
  pids+=("$apid")
}
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }   # USER_HZ = 100
hwm() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

printf '\n%-13s %-5s %8s %9s %11s %9s %8s %9s %s\n' agent sink seconds 'MiB/s' 'lines/s' 'peak MiB' 'CPU s' 'rcv CPU' check
for round in $(seq "$rounds"); do
  for sink in http file; do
    for agent in ${AGENTS:-outrigger ${OLD_BIN:+outrigger-old} rsyslog syslog-ng}; do
      if why=$(unavailable "$agent"); then
        printf '%-13s %-5s not measured: %s\n' "$agent" "$sink" "$why"; continue
      fi
      st=$dir/$agent-$sink; rm -rf "$st"; mkdir -p "$st"
      mkconf "$agent" "$sink" "$st" > "$st/conf"
      rpid=
      if [ "$sink" = http ]; then
        python3 bench/logs-receiver.py "$HTTP_PORT" "$TCP_PORT" "$lines" "$st/rcv.json" & rpid=$!; pids+=("$rpid")
        wait_port "$HTTP_PORT"
      fi
      t0=$(date +%s.%N); start_agent "$agent" "$st/conf" "$st"; ok=1
      deadline=$(( $(date +%s) + 600 ))
      while :; do
        if [ "$sink" = http ]; then [ -s "$st/rcv.json" ] && break
        else [ -s "$st/out.log" ] && tail -c 300 "$st/out.log" | grep -q bench-end && break; fi
        if ! kill -0 "$apid" 2>/dev/null || [ "$(date +%s)" -gt "$deadline" ]; then ok=0; break; fi
        sleep 0.02
      done
      t1=$(date +%s.%N)
      acpu=$(cpu "$apid" 2>/dev/null || echo '?'); apk=$(hwm "$apid" 2>/dev/null || echo '?')
      kill "$apid" 2>/dev/null || true; wait "$apid" 2>/dev/null || true
      rcpu=-; got=
      if [ -n "$rpid" ]; then
        rcpu=$(cpu "$rpid"); kill "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true
        [ -s "$st/rcv.json" ] && got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["lines"])' "$st/rcv.json")
        t1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["last"] or 0)' "$st/rcv.json" 2>/dev/null || echo "$t1")
      else
        got=$(wc -l < "$st/out.log" 2>/dev/null || echo 0)
      fi
      if [ "$ok" = 1 ]; then
        s=$(echo "$t1 - $t0" | bc -l)
        check="lines $got/$lines"; [ "$got" = "$lines" ] || check="$check MISMATCH"
        printf '%-13s %-5s %8.2f %9.1f %11.0f %9s %8s %9s %s\n' "$agent" "$sink" "$s" \
          "$(echo "$size / 1048576 / $s" | bc -l)" "$(echo "$lines / $s" | bc -l)" "$apk" "$acpu" "$rcpu" "$check"
      else
        printf '%-13s %-5s did not finish in %.0f s (%s lines arrived); stderr:\n' "$agent" "$sink" \
          "$(echo "$t1 - $t0" | bc -l)" "${got:-?}"; tail -5 "$st/stderr"
      fi
      rm -f "$st/out.log"
    done
  done
done

# ---- idle RSS: admin-only vs one file source (an empty file, an HTTP sink never called)
idle() { # $1 config → RSS MiB after ready + 2 s
  "$bin" run -c "$1" >/dev/null 2>"$1.err" & local p=$!; pids+=("$p")
  for _ in $(seq 200); do curl -fs "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null && break; sleep 0.05; done
  sleep 2; awk '/VmRSS/ {printf "%.2f", $2 / 1024}' "/proc/$p/status"; kill "$p"; wait "$p" 2>/dev/null || true
}
printf 'admin: { address: 127.0.0.1:%s }\n' "$ADMIN_PORT" > "$dir/admin.yaml"
: > "$dir/idle.log"
{ cat "$dir/admin.yaml"; printf 'logs:\n  sources: [ { files: %s } ]\n  sinks: [ { http: "http://127.0.0.1:9/x" } ]\n' "$dir/idle.log"; } > "$dir/idle.yaml"
[ -x "$bin" ] || exit 0
a=$(idle "$dir/admin.yaml"); b=$(idle "$dir/idle.yaml")
printf '\nidle RSS: admin-only %s MiB, one file source %s MiB (+%.2f MiB)\n' "$a" "$b" "$(echo "$b - $a" | bc -l)"
