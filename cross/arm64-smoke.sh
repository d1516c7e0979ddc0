#!/usr/bin/env bash
# The arm64 smoke run (kept for the commands people already use).
exec "$(dirname "$0")/arm-smoke.sh" arm64 "$@"
