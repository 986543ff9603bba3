#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, whose --help says what it measures), at most about 8 minutes:
#   bash benchmarks/gpu_check.sh [DATA_ROOT] [--out DIR] [KEY=VALUE ...]
# DATA_ROOT defaults to ../shared/data/cifar10-jpg beside the repository. Runs the repository's
# .venv if it has one, else $PYTHON (default python3), which must have normsweep installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"
if ! "$python" -c "import normsweep.conf" 2>/dev/null; then  # the configs come with the install only
  echo "gpu_check: $python cannot import normsweep and its configs; install it first: pip install -e $repo" >&2
  exit 2
fi
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
