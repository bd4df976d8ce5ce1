#!/usr/bin/env bash
# Ray for the GPU machine, which has no Ray and takes at most 64 MiB a call: Ray core's cp312 wheel and its
# dependencies, minus what init/actors/placement groups never load (Serve, the libraries, the dashboard's web
# build, jars, debug symbols), as one xz tarball of about 17 MB in .raypack/ (git-ignored).
#
#   bash benchmarks/ray_bundle_gpu.sh                    # here, once
#   run(carry=[".raypack"], command="mkdir -p /tmp/site && tar -C /tmp/site -xJf .raypack/raysite.tar.xz &&
#       export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks && python3 benchmarks/bench_tp_overhead.py --ray")
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RAY=${RAY_VERSION:-$(.venv/bin/python -c "import ray; print(ray.__version__)")}
DEPS="click jsonschema jsonschema-specifications referencing rpds-py attrs msgpack protobuf pyyaml requests urllib3
      idna certifi charset-normalizer packaging"  # Ray core's needs; filelock and typing_extensions come with torch
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$work/whl" "ray==$RAY" $DEPS
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
cd "$work/site/ray"
rm -rf jars dashboard/client rllib tune train data air serve workflow llm
mkdir -p dashboard/client/build/static  # the dashboard head, when it runs, wants this folder to exist
echo '<html><body>no dashboard UI in this bundle</body></html>' > dashboard/client/build/index.html
cd "$work/site"
find . \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \) -type f -delete
find . -name __pycache__ -type d -prune -exec rm -rf {} +
find . -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0 | while IFS= read -r -d '' f; do
  if [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = "177ELF" ]; then strip --strip-unneeded "$f"; fi
done
cd "$root"
mkdir -p .raypack
grep -qx '/.raypack/' .git/info/exclude 2>/dev/null || echo '/.raypack/' >> .git/info/exclude
XZ_OPT=-9 tar -C "$work/site" -cJf .raypack/raysite.tar.xz .
ls -la .raypack/raysite.tar.xz
