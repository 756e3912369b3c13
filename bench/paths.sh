#!/bin/bash
# Server CPU per GiB and throughput of blob pulls over each transport: 8
# parallel curl clients pull a 100 MiB blob 48 times over plain HTTP/1.1
# (sendfile path), h2c and HTTPS/1.1 (copying paths). trow-bench speaks only
# plain HTTP/1.1, hence curl. Usage: bench/paths.sh /path/to/trow
BIN=$1; W=$(mktemp -d /tmp/paths.XXXX)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout $W/key.pem -out $W/cert.pem >/dev/null 2>&1
head -c $((100*1024*1024)) /dev/urandom > $W/blob; D=sha256:$(sha256sum $W/blob | cut -d' ' -f1)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # name scheme extra-curl-args... ; server started with tls flags in TLSARGS
  local name=$1 scheme=$2; shift 2
  local P=$((20000 + RANDOM % 30000))
  TROW_LOG_LEVEL=error $BIN --bind 127.0.0.1:$P --data-dir $W/data-$name $TLSARGS > $W/log-$name 2>&1 &
  local PID=$!
  for i in $(seq 50); do curl -sfk -o /dev/null $scheme://127.0.0.1:$P/v2/ && break; sleep 0.2; done
  local LOC=$(curl -sk -D - -o /dev/null -X POST $scheme://127.0.0.1:$P/v2/p/blobs/uploads/ | awk -F': ' 'tolower($1)=="location"{print $2}' | tr -d '\r')
  case $LOC in /*) LOC=$scheme://127.0.0.1:$P$LOC;; esac
  curl -sfk -X PUT --data-binary @$W/blob "$LOC&digest=$D" -H 'Content-Type: application/octet-stream' -o /dev/null || curl -sfk -X PUT --data-binary @$W/blob "$LOC?digest=$D" -o /dev/null
  curl -sk "$@" -o /dev/null $scheme://127.0.0.1:$P/v2/p/blobs/$D   # warm
  local N=48; local c0=$(cpu $PID); local t0=$(date +%s.%N)
  seq $N | xargs -P8 -I{} curl -sk "$@" -o /dev/null $scheme://127.0.0.1:$P/v2/p/blobs/$D
  local t1=$(date +%s.%N); local c1=$(cpu $PID)
  local tick=$(getconf CLK_TCK)
  python3 -c "n=$N; s=$t1-$t0; c=($c1-$c0)/$tick; gib=n*100/1024; print(f'$name: {n*100/s:.0f} MiB/s, server CPU {c/gib:.3f} s/GiB, peak RSS', open('/proc/$PID/status').read().split('VmHWM:')[1].split()[0], 'KiB')"
  kill $PID; wait $PID 2>/dev/null
}
TLSARGS="" run http1 http --http1.1
TLSARGS="" run h2c http --http2-prior-knowledge
TLSARGS="--tls=$W/cert.pem,$W/key.pem" run https1 https --http1.1
rm -rf $W
