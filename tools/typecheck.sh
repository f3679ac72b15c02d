#!/usr/bin/env bash
# mypy over the package as it installs: hkd/, with plugins/ as hkd.plugins and kernels/ as
# hkd.kernels (the pyproject package-dir mapping). A temporary tree of symlinks gives mypy that
# layout; paths in its report are mapped back to the checkout's.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/hkd"
for f in "$repo"/hkd/*.py "$repo"/hkd/py.typed "$repo"/hkd/tasks; do ln -s "$f" "$tree/hkd/"; done
ln -s "$repo/plugins" "$tree/hkd/plugins"
ln -s "$repo/kernels" "$tree/hkd/kernels"
cd "$tree"
status=0
python -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p hkd "$@" > report.txt 2>&1 || status=$?
sed -e 's#^hkd/plugins/#plugins/#' -e 's#^hkd/kernels/#kernels/#' report.txt
exit $status
