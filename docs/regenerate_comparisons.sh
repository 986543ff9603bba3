#!/usr/bin/env bash
# The published pairwise comparisons, regenerated from the results.csv each report wrote (the runs themselves are
# not kept): python -m normsweep.report --from-csv writes comparisons.csv/.md from a runs table alone.
# Run from the repository root: bash docs/regenerate_comparisons.sh [holm|fdr|none]   (default: holm)
set -euo pipefail
correction=${1:-holm}
report() { python -m normsweep.report --from-csv "$1" --out "$2" --correction "$correction" > /dev/null; }

report docs/batch_size_study/results.csv docs/batch_size_study
report docs/new_norms_screen/confirmation/results.csv docs/new_norms_screen/confirmation
report docs/any_model_20ep/results.csv docs/any_model_20ep
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in tuned_3seeds tuned_bs512_3seeds; do  # these two pages are named after their sweep: <name>_comparisons.md
  report "docs/${name}_results.csv" "$tmp/$name"
  cp "$tmp/$name/comparisons.md" "docs/${name}_comparisons.md"
done
echo "regenerated with --correction $correction"
