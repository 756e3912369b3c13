#!/usr/bin/env bash
# Side-by-side benchmark of Trow and CNCF Distribution (docker-registry 2.8)
# on loopback, with trow-bench as the load generator.
#
# Both servers start on fresh data directories; every workload runs against
# each in turn (the order alternates per workload so that neither always gets
# the warmer page cache); trow-bench samples the server's CPU time and peak
# RSS from /proc around each case (--server-pid). The machine's ceilings
# (SHA-256 of one core, loopback TCP, synced disk writes in the directory that
# holds both data directories) are measured once, before Trow's first workload.
# The markdown comparison is written to bench/results/<UTC date>.md (plus the
# raw JSON lines) and printed.
#
# Usage: bench/compare.sh [--quick] [--no-build] [--only trow|distribution]
#                         [--workloads a,b,...] [--out FILE] [--keep]
#                         [-- extra trow-bench run options]
# Environment: TROW_BIN (default target/<host tuple>/release/trow), DIST_BIN (default
# docker-registry from PATH), BENCH_TARGET_DIR (cargo target dir for
# trow-bench, default target/).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
BUILD=1
ONLY=both
KEEP=0
OUT=""
WORKLOADS="push-mono,push-chunked,small-blobs,manifests-push,manifest-get,pull,pull-mixed,mixed-rw,catalog"
EXTRA=()

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --only) ONLY=${2:?--only needs trow or distribution}; shift ;;
    --workloads) WORKLOADS=${2:?--workloads needs a list}; shift ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "compare.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$ONLY" in both|trow|distribution) ;; *) echo "compare.sh: --only trow|distribution" >&2; exit 2 ;; esac

BENCH_TARGET_DIR=${BENCH_TARGET_DIR:-$ROOT/target}
# Binaries are under target/<host tuple>/ (see .cargo/config.toml).
HOST=$(rustc -vV | sed -n 's/^host: //p')
BENCH="$BENCH_TARGET_DIR/$HOST/release/trow-bench"
TROW_BIN=${TROW_BIN:-$ROOT/target/$HOST/release/trow}
DIST_BIN=${DIST_BIN:-$(command -v docker-registry || echo /usr/bin/docker-registry)}

if [ "$QUICK" = 1 ]; then
  # A smoke run: minutes, not tens of minutes; figures are indicative only.
  RUN_ARGS=(--sizes 1MiB,10MiB,64MiB --duration 3 --repos 200 --tags 200
            --catalog-iterations 2 --pull-blobs 2)
else
  RUN_ARGS=()
fi
RUN_ARGS+=("${EXTRA[@]}")

log() { echo "compare.sh: $*" >&2; }

# ---- build -------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  if [ "$ONLY" != distribution ]; then
    log "building trow"
    (cd "$ROOT" && cargo build --release -p trow)
  fi
  log "building trow-bench"
  (cd "$ROOT" && CARGO_TARGET_DIR="$BENCH_TARGET_DIR" cargo build --release -p trow-bench)
fi
[ -x "$BENCH" ] || { log "no trow-bench at $BENCH"; exit 1; }
if [ "$ONLY" != distribution ] && [ ! -x "$TROW_BIN" ]; then
  log "no trow binary at $TROW_BIN"; exit 1
fi
if [ "$ONLY" != trow ] && [ ! -x "$DIST_BIN" ]; then
  log "no docker-registry at $DIST_BIN (apt-get install docker-registry)"; exit 1
fi

# ---- servers -------------------------------------------------------------
WORK=$(mktemp -d /tmp/trow-compare.XXXXXX)
TROW_PID=""
DIST_PID=""
BENCH_PID=""

stop_server() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  stop_server "$BENCH_PID"
  stop_server "$TROW_PID"
  stop_server "$DIST_PID"
  if [ "$KEEP" = 1 ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nobody listens on.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  log "no free port found"; return 1
}

# Waits until GET /v2/ answers 200, or the server dies, or 60 s pass.
wait_ready() {
  local name=$1 pid=$2 port=$3 logf=$4
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during start-up; log:"; tail -20 "$logf" >&2; return 1
    fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/")" = 200 ]; then
      return 0
    fi
    sleep 0.2
  done
  log "$name did not answer GET /v2/ with 200 within 60 s; log:"; tail -20 "$logf" >&2
  return 1
}

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

TROW_IDLE=""
DIST_IDLE=""
if [ "$ONLY" != distribution ]; then
  TROW_PORT=$(free_port)
  mkdir -p "$WORK/trow-data"
  # Errors-only logging, like the Distribution config below: a log line per
  # request would otherwise be part of what is measured.
  TROW_LOG_LEVEL=${TROW_LOG_LEVEL:-error} \
    "$TROW_BIN" --bind "127.0.0.1:$TROW_PORT" --data-dir "$WORK/trow-data" >"$WORK/trow.log" 2>&1 &
  TROW_PID=$!
  wait_ready Trow "$TROW_PID" "$TROW_PORT" "$WORK/trow.log"
  sleep 1
  TROW_IDLE=$(rss_mib "$TROW_PID")
  log "Trow pid $TROW_PID on 127.0.0.1:$TROW_PORT, idle RSS ${TROW_IDLE} MiB"
fi
if [ "$ONLY" != trow ]; then
  DIST_PORT=$(free_port)
  mkdir -p "$WORK/dist-data"
  cat >"$WORK/dist-config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/dist-data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DIST_PORT
EOF
  "$DIST_BIN" serve "$WORK/dist-config.yml" >"$WORK/dist.log" 2>&1 &
  DIST_PID=$!
  wait_ready Distribution "$DIST_PID" "$DIST_PORT" "$WORK/dist.log"
  sleep 1
  DIST_IDLE=$(rss_mib "$DIST_PID")
  log "Distribution pid $DIST_PID on 127.0.0.1:$DIST_PORT, idle RSS ${DIST_IDLE} MiB"
fi

# ---- workloads -------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$WORK/trow.jsonl"
: >"$WORK/dist.jsonl"
FAILED=0
# The ceilings go with the first Trow run (the first Distribution run with
# --only distribution), into $WORK: the file system of both data directories.
CEILINGS_PENDING=1

run_one() {
  local who=$1 w=$2 port pid
  if [ "$who" = trow ]; then port=$TROW_PORT; pid=$TROW_PID; else port=$DIST_PORT; pid=$DIST_PID; fi
  local ceil_args=()
  if [ "$CEILINGS_PENDING" = 1 ] && { [ "$who" = trow ] || [ "$ONLY" = distribution ]; }; then
    ceil_args=(--ceilings-dir "$WORK")
    CEILINGS_PENDING=0
    log "machine ceilings, then $w on $who"
  else
    log "$w on $who"
  fi
  # In the background and waited for, so that Ctrl-C reaches the trap at
  # once instead of after the workload.
  "$BENCH" run --url "http://127.0.0.1:$port" --workload "$w" --json \
    --server-pid "$pid" "${ceil_args[@]}" "${RUN_ARGS[@]}" >>"$WORK/$who.jsonl" 2>>"$WORK/$who.bench.log" &
  BENCH_PID=$!
  local rc=0
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=""
  if [ "$rc" != 0 ]; then
    log "trow-bench reported errors for $w on $who (see below)"
    tail -5 "$WORK/$who.bench.log" >&2
    FAILED=1
  fi
}

i=0
IFS=',' read -r -a WL <<<"$WORKLOADS"
for w in "${WL[@]}"; do
  if [ $((i % 2)) = 0 ]; then order="trow dist"; else order="dist trow"; fi
  for who in $order; do
    if [ "$who" = trow ] && [ "$ONLY" = distribution ]; then continue; fi
    if [ "$who" = dist ] && [ "$ONLY" = trow ]; then continue; fi
    run_one "$who" "$w"
  done
  i=$((i + 1))
done

# ---- report ---------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%dT%H%MZ)
[ "$QUICK" = 1 ] && STAMP="$STAMP-quick"
mkdir -p "$ROOT/bench/results"
OUT=${OUT:-$ROOT/bench/results/$STAMP.md}
cp "$WORK/trow.jsonl" "${OUT%.md}-trow.jsonl"
cp "$WORK/dist.jsonl" "${OUT%.md}-distribution.jsonl"

idle_args=()
[ -n "$TROW_IDLE" ] && idle_args+=(--candidate-idle-rss-mib "$TROW_IDLE")
[ -n "$DIST_IDLE" ] && idle_args+=(--baseline-idle-rss-mib "$DIST_IDLE")
{
  echo "# Trow vs Distribution: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- Machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r); client and servers share the cores; loopback HTTP/1.1."
  echo "- Trow: $( [ "$ONLY" = distribution ] && echo "not run" || echo "$TROW_BIN (repository HEAD at run time: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none))")"
  echo "- Distribution: $( [ "$ONLY" = trow ] && echo "not run" || "$DIST_BIN" --version 2>&1 | head -1), filesystem storage"
  echo "- Command: \`bench/compare.sh$( [ "$QUICK" = 1 ] && echo " --quick")$( [ "$ONLY" != both ] && echo " --only $ONLY")\`; trow-bench options: \`${RUN_ARGS[*]:-(defaults)}\`"
  echo "- Load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running on the machine skews the figures)."
  echo "- Ratios are Trow/Distribution. Server CPU is utime+stime from /proc during each timed case; peak RSS is VmHWM, reset before each case."
  echo
  "$BENCH" compare --candidate "$WORK/trow.jsonl" --baseline "$WORK/dist.jsonl" "${idle_args[@]}"
} >"$OUT"
cat "$OUT"
log "results written to $OUT"
exit "$FAILED"
