#!/bin/sh
# Checks deploy/vppd.service with `systemd-analyze verify` when it is
# available; skips (exit 0) when it is not. Exits non-zero on verify errors.
#
# Usage: deploy/verify.sh [UNIT_FILE]   (default: deploy/vppd.service)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
unit=${1:-$here/vppd.service}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify.sh: systemd-analyze not found, skipped checking $unit"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# verify fails when ExecStart's binary does not exist; on a build machine
# /usr/bin/vppd usually does not, so point it at /bin/true in a copy. The
# copy keeps the unit name, since LoadCredential paths depend on it.
copy=$tmp/vppd.service
if [ -x /usr/bin/vppd ]; then
    cp "$unit" "$copy"
else
    sed 's|^ExecStart=/usr/bin/vppd |ExecStart=/bin/true |' "$unit" >"$copy"
fi

# systemd-analyze prints problems but may still exit 0 for some of them
# (unknown keys, bad values): treat any output as a failure.
out=$tmp/out
status=0
SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$copy" >"$out" 2>&1 || status=$?
# Noise from running outside a booted systemd host (containers, CI) that
# says nothing about the unit itself.
problems=$(grep -v \
    -e 'Failed to connect to bus' \
    -e 'Failed to open private bus' \
    -e 'unit_file_find_fragment' \
    -e 'Cannot add dependency job' \
    "$out" || true)

if [ "$status" -ne 0 ] || [ -n "$problems" ]; then
    cat "$out" >&2
    echo "verify.sh: $unit: systemd-analyze verify found problems" >&2
    exit 1
fi
echo "verify.sh: $unit: ok"
