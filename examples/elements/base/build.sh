#!/bin/sh
# Element "base": runs inside the image tree ($TARGET_ROOT) built by nodepool-image-create.
set -e
mkdir -p "$TARGET_ROOT/etc/ci"
echo "built for release ${DIB_RELEASE:-unknown}" > "$TARGET_ROOT/etc/ci/base"
