#!/usr/bin/env bash
# The Python package's tests: build the wheel with the profile and target directory `cargo test`
# uses (its dependencies are compiled once, for both), install it into a fresh venv, run pytest.
#   bash python/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/python-test-venv
rm -rf "$venv" "$root/target/wheels"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.9,<2' pytest pyarrow numpy pandas polars mypy
(cd python && "$venv/bin/maturin" build --quiet --profile dev --target-dir "$root/target" --out "$root/target/wheels")
"$venv/bin/pip" install --quiet --disable-pip-version-check "$root"/target/wheels/esmbed-*.whl
# The cargo-built command, compared with the wheel's where `cargo test` built it.
if [[ -x $root/target/debug/esmbed ]]; then
  export ESMBED_CARGO_BIN=$root/target/debug/esmbed
fi
cd "$root/target"   # import esmbed from the wheel, not from python/
"$venv/bin/python" -m pytest -q "$root/python/tests" "$@"
