#!/usr/bin/env bash
# The command behind bench/results/serve_waves_2026-12-06: two of our servers, prefill groups off
# (--prefill-group-tokens 0) and on (512, the default), one c = 16 closed loop of 64 requests each,
# three rounds in alternating order (seeds 11-13), then the first-wave / later TTFT split.
set -e
D=bench/results/serve_waves_2026-12-06
.venv/bin/alignserve serve --host 127.0.0.1 --port 8101 --prefill-group-tokens 0 > /tmp/waves_g0.log 2>&1 &
.venv/bin/alignserve serve --host 127.0.0.1 --port 8102 --prefill-group-tokens 512 > /tmp/waves_g512.log 2>&1 &
trap 'kill %1 %2' EXIT
for p in 8101 8102; do for i in $(seq 180); do curl -sf localhost:$p/health >/dev/null && break; sleep 1; done; done
for r in 0 1 2; do
  if [ $r = 1 ]; then order="8102 8101"; else order="8101 8102"; fi
  for p in $order; do
    name=$([ $p = 8101 ] && echo group0 || echo group512)
    .venv/bin/alignserve bench load --target $name=http://127.0.0.1:$p/v1 --concurrency 16 --num-requests 64 \
      --max-tokens 64 --seed $((r + 11)) --warmup 4 --output $D/${name}_r$r.json --plot $D/${name}_r$r.png > /dev/null
  done
done
.venv/bin/python -m bench.wave_split $D/group0_r*.json $D/group512_r*.json --out $D/split.json
