#!/usr/bin/env bash
# `make run`: start the local mesh, stream one sample generation through the
# gateway, then keep the mesh up until Ctrl-C.
set -euo pipefail
PORT="${MESHSERVE_PORT:-50051}"
out="$(mktemp)"
meshserve up --workers "${MESHSERVE_WORKERS:-2}" --port "$PORT" >"$out" &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up; rm -f "$out"' INT TERM
until grep -q "meshserve: ready" "$out"; do
  if ! kill -0 "$up" 2>/dev/null; then wait "$up"; exit $?; fi
  sleep 0.5
done
echo
echo "--- sample: meshserve generate --model tiny-llama 'Once upon a time'"
meshserve generate --target "127.0.0.1:$PORT" --model tiny-llama --max-tokens 32 "Once upon a time"
echo "--- sample: meshserve embed --model minilm"
meshserve embed --target "127.0.0.1:$PORT" --model minilm "a cat sat on the mat" "the stock market fell"
echo
echo "mesh running on 127.0.0.1:$PORT — Ctrl-C to stop"
wait "$up"
