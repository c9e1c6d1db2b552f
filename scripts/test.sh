#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (2 workers).  Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 -m pytest -n 2 --dist loadgroup -q -p no:cacheprovider "$@" tests
