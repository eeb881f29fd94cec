#!/usr/bin/env bash
# Run one command in several source trees, interleaved (round 1: A B ..., round 2: A B ...), so
# that a machine's drift between processes falls on every tree alike: how branches are compared
# on the lent GPU machine, in one device command.
#
#   tools/ab_trees.sh export REV DIR     # here: REV's tracked files into DIR (no .git; they
#                                        # travel to the GPU machine as untracked files)
#   tools/ab_trees.sh ROUNDS TREE... -- COMMAND...
#
#   tools/ab_trees.sh 2 . .branch_frag -- python3 benchmarks/profile_kernels.py --layers gpt2_dropout
#
# COMMAND runs inside each TREE with PYTHONPATH set to it (the package imports from there, not
# from an installed copy) and GIT_COMMIT to the tree's revision when known (benchmarks/common.py
# records it). Each run's output is prefixed with "[TREE round N]"; the exit status is the worst.
set -u
if [ "${1:-}" = export ]; then
  rev=$2 dir=$3
  mkdir -p "$dir" && git archive "$rev" | tar -x -C "$dir" || exit 1
  echo "$rev@$(git rev-parse --short "$rev")" > "$dir/.ab_revision"
  exit 0
fi
rounds=$1
shift
trees=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do trees+=("$1"); shift; done
[ "${1:-}" = -- ] && [ $# -gt 1 ] || { echo "usage: $0 ROUNDS TREE... -- COMMAND..." >&2; exit 2; }
shift
status=0
for round in $(seq 1 "$rounds"); do
  for tree in "${trees[@]}"; do
    # an exported tree's revision file; else the caller's GIT_COMMIT (a copied checkout's .git
    # may be stale); else git's word
    revision=$(cat "$tree/.ab_revision" 2>/dev/null || echo "${GIT_COMMIT:-}")
    [ -n "$revision" ] || revision=$(git -C "$tree" rev-parse --short HEAD 2>/dev/null)
    (cd "$tree" && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GIT_COMMIT="${revision:-unknown}" "$@") 2>&1 |
      sed "s|^|[$tree round $round] |"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
done
exit $status
