#!/usr/bin/env bash
# Fuzz every target for a while (default 60 s each), from the seed corpus in corpus/<target>/.
#   bash fuzz/run.sh            # all targets, 60 s each
#   bash fuzz/run.sh 300 fasta  # one target, 5 minutes
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New inputs go to
# target/fuzz-corpus/<target>/ (the committed seeds stay as they are); crashes to
# fuzz/artifacts/<target>/, with the command that reproduces them in the log. Prints each target's
# executions and coverage (libFuzzer's `cov:` edges and `ft:` features) at the end of its run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(fasta parquet config checkpoint)
cargo +nightly fuzz build --dev
for t in "${targets[@]}"; do
  work=../target/fuzz-corpus/$t
  mkdir -p "$work"
  log=../target/fuzz-$t.log
  # -malloc_limit_mb: an allocation proportional to a size field rather than to the input is a
  # bug. Except, for Parquet, the parquet crate's own: it reserves a page's declared uncompressed
  # size (an i32, so at most 2 GiB of address space, never touched) before it decompresses and
  # finds the page corrupt; esmbed cannot bound that without replacing the reader.
  malloc=512
  [[ $t == parquet ]] && malloc=2100
  RUST_BACKTRACE=0 cargo +nightly fuzz run --dev "$t" "$work" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2560 -malloc_limit_mb=$malloc -timeout=10 -max_len=65536 \
    >"$log" 2>&1 || { echo "$t: FAILED (see $log)"; tail -30 "$log"; exit 1; }
  echo "$t: $(grep -E '^Done|^#[0-9]+.*(DONE|pulse)' "$log" | tail -1)"
  grep -E '^#[0-9]+' "$log" | tail -1
done
