#!/usr/bin/env bash
# Every performance target (docs/design.md, performance targets) in one go:
# p1p2.sh, p3.sh, p4.sh, p5.sh (when present), p6.sh, one after the other,
# then one table of each figure against its target. Each script prints its
# figures as lines
#
#   RESULT <target> <what> <key>=<value> [target<op><number>] [more key=value]
#
# which this script collects; a figure without a `target` is shown for
# reference. Each script's full output is kept in $LOGS (default: a new
# temporary directory, printed at the end). `ONLY` picks the scripts here and
# is not passed on (p5.sh reads its own `ONLY`, a regex on query names).
#
#   bash bench/run.sh                 # everything
#   ONLY="p1p2 p3" bash bench/run.sh  # a subset
#   ONLY=analytics ANALYTICS_DB=bench_p5 bash bench/run.sh
#                                     # issue 14's analytics target (not in the
#                                     # default set: it loads 1 M sessions first)
set -uo pipefail
cd "$(dirname "$0")/.."
ONLY=${ONLY:-p1p2 p3 p4 p5 p6}
LOGS=${LOGS:-$(mktemp -d /tmp/bench-run.XXXXXX)}
mkdir -p "$LOGS"
started=$(date -u +%FT%TZ)
rows=()

for b in $ONLY; do
  script=bench/$b.sh
  if [ ! -f "$script" ]; then
    rows+=("${b^^} - - - skipped ($script not present)")
    continue
  fi
  echo "=== $script ($(date -u +%T) UTC)" >&2
  env -u ONLY bash "$script" 2>&1 | tee "$LOGS/$b.log" >&2
  rc=${PIPESTATUS[0]}
  n=0
  while read -r _ id what figure rest; do
    target=-
    for f in $rest; do case $f in target*) target=${f#target} ;; esac; done
    verdict=-
    if [ "$target" != - ]; then
      op=$(sed -E 's/^([<>]=?).*/\1/' <<<"$target")
      bound=${target#"$op"}
      value=${figure#*=}
      verdict=$(awk -v v="$value" -v b="$bound" -v op="$op" 'BEGIN {
        if (v == "" || v !~ /^[0-9.]+$/) { print "no figure"; exit }
        m = (op == ">=" && v + 0 >= b + 0) || (op == "<=" && v + 0 <= b + 0) ||
            (op == ">" && v + 0 > b + 0) || (op == "<" && v + 0 < b + 0)
        print (m ? "met" : "NOT MET") }')
    fi
    rows+=("$id $what $figure $target $verdict")
    n=$((n + 1))
  done < <(grep -a '^RESULT ' "$LOGS/$b.log")
  [ "$rc" = 0 ] || rows+=("${b^^} - - - failed (exit $rc, see $LOGS/$b.log)")
  [ "$n" -gt 0 ] || [ "$rc" != 0 ] || rows+=("${b^^} - - - no RESULT lines")
done

echo
echo "# bench/run.sh: started $started, ended $(date -u +%FT%TZ); $(nproc) cores; logs in $LOGS"
printf '%-4s %-24s %-26s %-10s %s\n' target what figure bound verdict
for r in "${rows[@]}"; do
  read -r id what figure target verdict <<<"$r"
  printf '%-4s %-24s %-26s %-10s %s\n' "$id" "$what" "$figure" "$target" "$verdict"
done
