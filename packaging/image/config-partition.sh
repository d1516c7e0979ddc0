#!/usr/bin/env bash
# Reads or writes the PLANTEDGE configuration partition of a gateway image
# file (not a card: on a card, mount the partition like any USB drive).
#
#   config-partition.sh IMAGE put FILE|DIR...   copy into the partition
#   config-partition.sh IMAGE get NAME           print a file from it
#   config-partition.sh IMAGE ls                 list it
set -euo pipefail
image=${1:?usage: config-partition.sh IMAGE put|get|ls ...}
command=${2:?put, get or ls}
shift 2
start=$(sfdisk --json "$image" | python3 -c '
import json, sys
table = json.load(sys.stdin)["partitiontable"]
part = next(p for p in table["partitions"] if p.get("name") == "PLANTEDGE")
print(part["start"] * table.get("sectorsize", 512))')
export MTOOLS_SKIP_CHECK=1
fat="$image@@$start"
case $command in
  put) mcopy -o -s -i "$fat" "$@" ::/ ;;
  get) mtype -i "$fat" "::/${1:?file name}" | tr -d '\r' ;;
  ls) mdir -b -i "$fat" ::/ ;;
  *) echo "config-partition.sh: unknown command '$command' (put, get, ls)" >&2; exit 2 ;;
esac
