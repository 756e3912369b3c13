#!/usr/bin/env bash
# Measures Trow's pull-through cache against its upstream, side by side on
# this machine: time to first byte and total time of a 200 MiB layer, cold
# (through Trow, nothing cached) versus directly from the upstream, for 1 and
# 20 concurrent clients; how many times the upstream served the layer; and a
# warm pull through the cache versus a pull of the same layer pushed to Trow.
#
# Upstream: CNCF Distribution (Debian package docker-registry) on loopback.
# Usage: bench/proxy_measure.sh [size_mib]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-200}
CLIENTS=20
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release -p trow -q
# Binaries are under target/<host tuple>/ (see .cargo/config.toml).
HOST=$(rustc -vV | sed -n 's/^host: //p')
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$1/v2/" && return 0; sleep 0.05; done; echo "port $1 never answered" >&2; exit 1; }

# --- upstream ---
UP=$(free_port)
cat > "$work/dist.yml" <<YAML
version: 0.1
log: { level: error }
storage: { filesystem: { rootdirectory: $work/dist }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$UP }
YAML
docker-registry serve "$work/dist.yml" > "$work/dist.access" 2> "$work/dist.log" & pids+=($!)
wait_port "$UP"

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$work/layer"
LAYER=sha256:$(sha256sum "$work/layer" | cut -d' ' -f1)
push_blob() { # url repo file digest
  local loc; loc=$(curl -si -X POST "$1/v2/$2/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case "$loc" in /*) loc="$1$loc";; esac
  case "$loc" in *\?*) loc="$loc&digest=$4";; *) loc="$loc?digest=$4";; esac
  curl -sf -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' -T "$3" "$loc"
}
push_blob "http://127.0.0.1:$UP" bench/image "$work/layer" "$LAYER"

start_trow() { # data-dir -> sets TROW, TROW_PID
  TROW=$(free_port)
  printf 'registry_proxies:\n  registries:\n    - host: "127.0.0.1:%s"\n      alias: up\n      insecure: true\n' "$UP" > "$work/trow.yaml"
  "target/$HOST/release/trow" --bind "127.0.0.1:$TROW" --data-dir "$1" --config-file "$work/trow.yaml" --log-level warn 2>> "$work/trow.log" &
  TROW_PID=$!; pids+=($TROW_PID)
  wait_port "$TROW"
}

# One pull: prints "ttfb total" in seconds.
pull() { curl -s -o /dev/null -w '%{time_starttransfer} %{time_total}\n' "$1"; }
# N concurrent pulls of one URL: prints median and max of ttfb and total.
pull_n() {
  seq "$2" | xargs -P "$2" -I{} curl -s -o /dev/null -w '%{time_starttransfer} %{time_total}\n' "$1" > "$work/times"
  python3 - "$work/times" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
t, tot = [r[0] for r in rows], [r[1] for r in rows]
print(f"{statistics.median(t)*1000:.0f} {max(t)*1000:.0f} {statistics.median(tot)*1000:.0f} {max(tot)*1000:.0f}")
PY
}
upstream_gets() { grep -c "GET /v2/bench/image/blobs/$LAYER" "$work/dist.access" || true; }

direct="http://127.0.0.1:$UP/v2/bench/image/blobs/$LAYER"
echo "layer: $SIZE_MIB MiB, $CLIENTS concurrent clients, $(nproc) cores, $(date -u +%F)"
echo
printf '%-44s %10s %10s %10s %10s %8s\n' "pull" "ttfb p50" "ttfb max" "total p50" "total max" "upstream"
row() { printf '%-44s %8s ms %8s ms %8s ms %8s ms %8s\n' "$@"; }

pull "$direct" > /dev/null # warm the upstream's page cache
read -r t tot <<<"$(pull "$direct")"
row "direct from upstream, 1 client" "$(printf %.0f "$(echo "$t*1000" | bc)")" "-" "$(printf %.0f "$(echo "$tot*1000" | bc)")" "-" "-"
before=$(upstream_gets)
start_trow "$work/trow1"
read -r t tot <<<"$(pull "http://127.0.0.1:$TROW/v2/f/up/bench/image/blobs/$LAYER")"
row "cold through Trow, 1 client" "$(printf %.0f "$(echo "$t*1000" | bc)")" "-" "$(printf %.0f "$(echo "$tot*1000" | bc)")" "-" "$(( $(upstream_gets) - before ))"
read -r t tot <<<"$(pull "http://127.0.0.1:$TROW/v2/f/up/bench/image/blobs/$LAYER")"
row "warm through Trow, 1 client" "$(printf %.0f "$(echo "$t*1000" | bc)")" "-" "$(printf %.0f "$(echo "$tot*1000" | bc)")" "-" "0"
kill "$TROW_PID"

before=$(upstream_gets)
read -r a b c d <<<"$(pull_n "$direct" $CLIENTS)"
row "direct from upstream, $CLIENTS clients" "$a" "$b" "$c" "$d" "$(( $(upstream_gets) - before ))"
before=$(upstream_gets)
start_trow "$work/trow2"
read -r a b c d <<<"$(pull_n "http://127.0.0.1:$TROW/v2/f/up/bench/image/blobs/$LAYER" $CLIENTS)"
row "cold through Trow, $CLIENTS clients" "$a" "$b" "$c" "$d" "$(( $(upstream_gets) - before ))"
read -r a b c d <<<"$(pull_n "http://127.0.0.1:$TROW/v2/f/up/bench/image/blobs/$LAYER" $CLIENTS)"
row "warm through Trow, $CLIENTS clients" "$a" "$b" "$c" "$d" "0"
push_blob "http://127.0.0.1:$TROW" local/image "$work/layer" "$LAYER"
read -r a b c d <<<"$(pull_n "http://127.0.0.1:$TROW/v2/local/image/blobs/$LAYER" $CLIENTS)"
row "pushed to Trow, $CLIENTS clients" "$a" "$b" "$c" "$d" "-"
read -r t tot <<<"$(pull "http://127.0.0.1:$TROW/v2/local/image/blobs/$LAYER")"
row "pushed to Trow, 1 client" "$(printf %.0f "$(echo "$t*1000" | bc)")" "-" "$(printf %.0f "$(echo "$tot*1000" | bc)")" "-" "-"
