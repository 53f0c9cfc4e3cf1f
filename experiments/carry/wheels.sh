#!/usr/bin/env bash
# Downloads the carried wheels (experiments/carry/wheels.txt, for Python 3.12 on manylinux x86-64,
# dependencies not resolved: the list names every one) into .whl/ (ignored by git), removes wheels
# of that folder the list no longer names, and prints the size that travels with the working tree
# (at most 64 MiB in all). A pin without a Python 3.12 wheel fails here.
#
#   bash experiments/carry/wheels.sh [DEST]        # DEST defaults to .whl
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" -r experiments/carry/wheels.txt
python3 - "$dest" <<'PY'
import os, re, sys
dest = sys.argv[1]
canon = lambda n: re.sub(r'[-_.]+', '-', n).lower()
want = {}
for line in open('experiments/carry/wheels.txt'):
  line = line.split('#', 1)[0].strip()
  if line:
    name, _, version = line.partition('==')
    want[canon(name)] = version.strip()
have = {}
for f in sorted(os.listdir(dest)):
  if not f.endswith('.whl'):
    continue
  name, version = f.split('-')[:2]
  if want.get(canon(name)) != version:
    os.remove(os.path.join(dest, f))
    print(f'removed {f}: not in the list')
    continue
  have[canon(name)] = os.path.getsize(os.path.join(dest, f))
missing = sorted(set(want) - set(have))
if missing:
  sys.exit(f'error: no wheel for {missing}')
print(f'{len(have)} wheels, {sum(have.values()) / 2**20:.1f} MiB in {dest}')
PY
tree=$(git ls-files -z | xargs -0 cat | wc -c)
wheels=$(cat "$dest"/*.whl | wc -c)
echo "carried: $(( (tree + wheels) / 1048576 )) MiB ($(( tree / 1024 )) KiB tree + wheels), limit 64 MiB"
