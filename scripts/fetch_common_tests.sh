#!/usr/bin/env bash
# Fetch transformers' shared test mixins for the transformers that PYTHON imports: tests/*.py of that version's source
# distribution on the package index, unpacked as the package `transformers_common_tests` under
# .cache/transformers-tests/VERSION/, with tests/common_test_shims/ laid over it for the helper modules that the
# sdist does not ship (see its README).
# tests/test_conformance.py runs them. Nothing is copied into the repository.
# usage: scripts/fetch_common_tests.sh PYTHON
set -euo pipefail
python=${1:?usage: scripts/fetch_common_tests.sh PYTHON}
cd "$(dirname "$0")/.."
version=$("$python" -c 'import transformers; print(transformers.__version__)')
dest=.cache/transformers-tests/$version
package=$dest/transformers_common_tests
if [ -f "$package/test_modeling_common.py" ]; then
  exit 0
fi
echo "Fetching transformers $version's common test files (source distribution)..."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "transformers==$version" -d "$scratch"
tar -xzf "$scratch"/transformers-"$version".tar.gz -C "$scratch" --wildcards "transformers-$version/tests/*.py"
mkdir -p "$scratch/out/transformers_common_tests"
cp "$scratch/transformers-$version"/tests/*.py "$scratch/out/transformers_common_tests/"
cp -r tests/common_test_shims/. "$scratch/out/"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$scratch/out" "$dest"  # whole or not at all
