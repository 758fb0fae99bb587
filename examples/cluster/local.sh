#!/usr/bin/env bash
# A local cluster on loopback: one scheduler, two executors, and a query through it.
#
#   bash examples/cluster/local.sh [MODEL] [FASTA]
#
# MODEL defaults to the repository's tiny fixture (random weights: the vectors mean nothing, the
# plumbing is real); use 650M or a directory for real embeddings. FASTA defaults to the
# fixture's sequences. Every process is stopped by its PID when the script ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${1:-tests/fixtures/tiny_h64}
FASTA=${2:-$PWD/examples/data/some_proteins.fasta}
ESMBED=${ESMBED:-target/release/esmbed}
[ -x "$ESMBED" ] || cargo build --release
OUT=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$OUT"' EXIT

"$ESMBED" scheduler --bind 127.0.0.1:50050 2>"$OUT/scheduler.log" &
PIDS+=($!)
for i in 0 1; do
  port=$((50051 + 2 * i))   # each executor takes its port and the next
  "$ESMBED" executor --scheduler 127.0.0.1:50050 --bind 127.0.0.1:$port \
    --model "$MODEL" --device cpu --work-dir "$OUT/work$i" 2>"$OUT/executor$i.log" &
  PIDS+=($!)
done

echo "waiting for two executors to register..."
for _ in $(seq 1 120); do
  n=$(curl -s http://127.0.0.1:50050/api/executors | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$n" = 2 ] && break
  sleep 0.5
done
[ "$n" = 2 ] || { echo "executors did not register:"; tail "$OUT"/*.log; exit 1; }

"$ESMBED" sql --cluster 127.0.0.1:50050 --model "$MODEL" -c "
  CREATE EXTERNAL TABLE proteins STORED AS FASTA LOCATION '$FASTA';
  COPY (SELECT id, esm_embed(sequence) AS embedding FROM proteins) TO '$OUT/emb/' STORED AS PARQUET;
  CREATE EXTERNAL TABLE emb STORED AS PARQUET LOCATION '$OUT/emb/';
  SELECT count(*) AS rows, arrow_typeof(first_value(embedding)) AS type FROM emb;"
echo "embeddings written under $OUT/emb/ (removed at exit); logs were in $OUT"
