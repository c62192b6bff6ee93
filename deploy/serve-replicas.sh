#!/usr/bin/env bash
# N runner replicas and one API on this host: `make serve-replicas N=2`.
#
# Each runner is its own `start-http-server --service-name LLMRunner` process on a port of its
# own (RUNNER_PORT, RUNNER_PORT+1, ...), so the API can address each one and route by where a
# prompt's KV already is (api/router.py). BentoML's own `workers: N` on the runner cannot do
# that: its workers share one listening socket, and the kernel, not the API, picks the worker.
#
# The cores are split between the runners (LLM_TORCH_THREADS, unless set): two torch
# processes with two OpenMP threads each on two cores slow each other about 20x.
#
# Ctrl+C or SIGTERM stops the API first (it drains), then the runners.
set -euo pipefail

N=${N:-2}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-3000}
RUNNER_PORT=${RUNNER_PORT:-3001}
GRACE=${GRACE:-30}
KEEP_ALIVE=${KEEP_ALIVE:-75} # the API's idle client connections (docs/operations.md)
SERVICE=${SERVICE:-service:ChatAPI}
HOST=${HOST:-127.0.0.1}

if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
    echo "N must be a whole number of runner replicas, got '$N'" >&2
    exit 2
fi
threads=${LLM_TORCH_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
start=("$PY" -m bentoml_cli._internal.start start-http-server "$SERVICE")

# Each server a BENTOML_HOME of its own over the one model store: BentoML keeps its metrics
# files in $BENTOML_HOME/prometheus_multiproc_dir and every server start wipes that folder,
# so servers sharing a home would lose each other's series and report each other's load.
store=${BENTOML_HOME:-$HOME/bentoml}
homes=$(mktemp -d -t llm-replicas.XXXXXX)
own_home() {
    mkdir -p "$homes/$1" && ln -s "$store/models" "$homes/$1/models" && echo "$homes/$1"
}

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$homes"
}
trap stop INT TERM EXIT

urls=()
for ((i = 0; i < N; i++)); do
    port=$((RUNNER_PORT + i))
    urls+=("http://$HOST:$port")
    echo "runner replica $i on :$port ($threads torch thread(s))" >&2
    BENTOML_HOME=$(own_home "runner-$i") LLM_TORCH_THREADS=$threads \
        "${start[@]}" --service-name LLMRunner --host "$HOST" \
        --port "$port" --timeout-graceful-shutdown "$GRACE" &
    pids+=($!)
done

runner_urls=$(IFS=,; echo "${urls[*]}")
echo "API on :$PORT over $runner_urls" >&2
# The API alone (LLM_RUNNER_URL set: no runner in its graph, no torch in its process). It is
# ready once one replica is; the router brings the others in as they come up.
BENTOML_HOME=$(own_home api) LLM_RUNNER_URL=$runner_urls \
    "${start[@]}" --port "$PORT" --timeout-graceful-shutdown "$GRACE" \
    --timeout-keep-alive "$KEEP_ALIVE" &
api=$!
pids=("$api" "${pids[@]}")
wait "$api"
