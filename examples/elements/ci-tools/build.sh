#!/bin/sh
# Element "ci-tools": records the tools a CI node should carry (from the image's env-vars).
set -e
mkdir -p "$TARGET_ROOT/etc/ci"
echo "${TOOLS:-}" > "$TARGET_ROOT/etc/ci/tools"
