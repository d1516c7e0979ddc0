#!/usr/bin/env bash
# Power cuts on the gateway image, many of them: the VM test of
# scripts/test.sh (tests/tests/gateway_vm.rs) with N power cuts instead of
# 3. Each cut kills qemu at a random moment (the guest loses every page it
# had not synced) and boots again; at the end everything the PLC saw
# acknowledged and every part it counted must be at the ERP. About 75 s per
# cut on this kind of machine.
#
#   scripts/power-cuts.sh [N]      # default 100; needs the image scripts/test.sh builds
set -euo pipefail
cd "$(dirname "$0")/.."
PLANT_EDGE_VM_POWER_CUTS=${1:-100} exec cargo nextest run -p plant-edge-tests \
  --test gateway_vm --no-capture
