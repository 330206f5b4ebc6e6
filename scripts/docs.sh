#!/usr/bin/env bash
# Build the documentation site with `mkdocs build --strict`, which fails on a broken
# link, a missing page or a missing fragment. The reference parts are generated from
# the code during the build itself (docs/hooks/generated.py runs scripts/gen_docs.py),
# so `python -m mkdocs serve` previews the same site.
#   bash scripts/docs.sh             # into site/
#   bash scripts/docs.sh /tmp/site   # into another directory
set -euo pipefail
SITE=$(realpath -m "${1:-$(dirname "$0")/../site}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import commlmo, mkdocs, material, mkdocstrings_handlers.python, mathjax" 2>/dev/null; then
  bash scripts/setup.sh
fi
exec "$PY" -m mkdocs build --strict --site-dir "$SITE"
