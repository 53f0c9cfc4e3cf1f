r"""What the GPU retention kernels cost an H100 in registers, spills and shared memory, compiled
without a GPU (jax's CUDA plugin given the H100's description, as `aot` does).

  PYTHONPATH=CUDA_DIR:. python -m experiments.kernel_resources --output_dir=/tmp/kernel_resources

CUDA_DIR holds the CUDA plugin (`pip install --no-deps --target CUDA_DIR jax-cuda12-plugin==<jax>
jax-cuda12-pjrt==<jax>`, or cuda13). Registers and spills need ptxas: $PTXAS, ptxas of an
`nvidia-cuda-nvcc-cu12` package on the path (XLA then also assembles its own kernels: slower), or
ptxas on PATH; without it they are not reported. Every case compiles the forward and the backward at
B = 2, T = 256, H = 2, chunk 64; XLA's dump gives each Triton kernel's PTX, threads and shared
memory, and `ptxas -v` for sm_90a gives its registers and spills. Cases: K = V = 64 and 128,
bfloat16 and float32, with and without resets, a fixed γ per head; and the bfloat16 ones with a
per-token (gated) decay. Writes resources.json and table.md.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix='kernel_resources_')
# Read once, when jax starts its first backend: so set before jax is imported.
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_dump_to={_DUMP}'.strip()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

H100_SHARED_BYTES = 227 * 1024  # Most shared memory one H100 block may use.
H100_REGISTERS = 255  # Per thread; beyond them values spill to local memory.
CASES = (tuple(itertools.product((64, 128), ('bfloat16', 'float32'), (False, True), (False,)))
         + tuple(itertools.product((64, 128), ('bfloat16',), (False, True), (True,))))


def ptxas() -> str | None:
  """$PTXAS, ptxas from an `nvidia-cuda-nvcc` package on the path, or on PATH; None if none."""
  if os.environ.get('PTXAS'):
    return os.environ['PTXAS']
  for entry in sys.path:
    path = os.path.join(entry, 'nvidia', 'cuda_nvcc', 'bin', 'ptxas')
    if os.access(path, os.X_OK):
      return path
  return shutil.which('ptxas')


def _compile(dim: int, dtype: str, resets: bool, gated: bool, devices) -> None:
  from retnet_jax import retention_pallas  # pylint: disable=g-import-not-at-top
  B, T, H = 2, 256, 2
  dt = jnp.dtype(dtype)
  spec = lambda *shape, dtype=dt: jax.ShapeDtypeStruct(shape, dtype)
  log_gamma = spec(B, T, H, dtype=jnp.float32) if gated else spec(H, dtype=jnp.float32)
  args = [spec(B, T, H, dim), spec(B, T, H, dim), spec(B, T, H, dim), log_gamma,
          spec(B, H, dim, dim, dtype=jnp.float32)]
  if resets:
    args.append(spec(B, T, dtype=jnp.bool_))

  def loss(q, k, v, lg, s0, *reset):
    o, s = retention_pallas.chunkwise(q, k, v, lg, s0, reset=(*reset, None)[0], chunk_size=64,
                                      target='gpu')
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), in_shardings=sharding)
  fn.trace(*args).lower(lowering_platforms=('cuda',)).compile()


def _kernels(files: list[str], tool: str | None) -> list[dict]:
  """Each Triton kernel of one compiled module: threads and shared memory (XLA's thunk sequence),
  registers and spills (ptxas -v on the module's PTX)."""
  out = {}
  for path in [f for f in files if f.endswith('thunk_sequence.txt')]:
    with open(path) as f:
      for m in re.finditer(r'kCustomKernel.*? (retention_\w+) grid: \[([\d, ]+)\] threads: '
                           r'\[(\d+),.*?shared_memory: (\d+) bytes', f.read()):
        out[m.group(1)] = {'kernel': m.group(1), 'grid': [int(x) for x in m.group(2).split(',')],
                           'threads': int(m.group(3)), 'shared_bytes': int(m.group(4))}
  for path in [f for f in files if f.endswith('.ptx') and os.path.getsize(f)]:
    with open(path) as f:
      if tool is None or '.entry retention_' not in f.read():
        continue
    proc = subprocess.run([tool, '-arch=sm_90a', '-v', path, '-o', os.devnull],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
      raise RuntimeError(f'ptxas failed on {path}: {proc.stderr[-2000:]}')
    for block in proc.stderr.split("Compiling entry function '")[1:]:
      name = block.split("'", 1)[0]
      spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', block)
      regs = re.search(r'Used (\d+) registers', block)
      out.setdefault(name, {'kernel': name}).update(
          registers=int(regs.group(1)), spill_store_bytes=int(spills.group(1)),
          spill_load_bytes=int(spills.group(2)))
  return sorted(out.values(), key=lambda r: r['kernel'])


def measure(cases=CASES) -> dict:
  """{'ptxas': path or None, 'rows': [{K, V, dtype, resets, gated, kernel, threads, shared_bytes,
  registers, spill_store_bytes, ...}]} for each case's forward and backward kernels."""
  from retnet_jax import aot  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices(aot.parse_topology('h100-1'))
  tool = ptxas()
  rows = []
  for dim, dtype, resets, gated in cases:
    case = {'K': dim, 'V': dim, 'dtype': dtype, 'resets': resets, 'gated': gated, 'chunk': 64}
    before = set(glob.glob(os.path.join(_DUMP, '*')))
    try:
      _compile(dim, dtype, resets, gated, devices)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({**case, 'kernel': 'retention_(compile)',
                   'error': str(e).strip().splitlines()[0]})
      continue
    files = sorted(set(glob.glob(os.path.join(_DUMP, '*'))) - before)
    for row in [r for r in _kernels(files, tool) if r['kernel'].startswith('retention_')]:
      rows.append({**case, **row})
  return {'ptxas': tool, 'device': str(devices[0].device_kind), 'rows': rows}


def table(results: dict) -> str:
  lines = [f'{results["device"]}, sm_90a, chunk 64; registers and spills from '
           f'{"ptxas -v" if results["ptxas"] else "(no ptxas: not reported)"}.', '',
           '| K = V | dtype | resets | decay | kernel | threads | registers | spill stores (B) '
           '| shared memory (KiB) |', '|---:|---|---|---|---|---:|---:|---:|---:|']
  for r in [r for r in results['rows'] if r['kernel'].startswith('retention_')]:
    lines.append(f'| {r["K"]} | {r["dtype"]} | {"yes" if r["resets"] else "no"} | '
                 f'{"per token" if r["gated"] else "per head"} | '
                 f'{r["kernel"]} | {r.get("threads", "–")} | {r.get("registers", "–")} | '
                 f'{r.get("spill_store_bytes", "–")} | '
                 f'{r.get("shared_bytes", 0) / 1024:.0f} |')
  errors = [r for r in results['rows'] if 'error' in r]
  lines += [''] + [f'K = V = {r["K"]} {r["dtype"]} resets {r["resets"]} gated {r["gated"]}: '
                   f'{r["error"]}' for r in errors]
  return '\n'.join(lines) + '\n'


def define_flags() -> dict:
  return dict(output_dir=flags.DEFINE_string('output_dir', None,
                                             'Where resources.json and table.md go.',
                                             required=True))


def main(argv, fl) -> None:
  del argv
  jax.config.update('jax_platforms', 'cpu')
  results = measure()
  os.makedirs(fl['output_dir'].value, exist_ok=True)
  with open(os.path.join(fl['output_dir'].value, 'resources.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(fl['output_dir'].value, 'table.md'), 'w') as f:
    f.write(table(results))
  print(table(results))
  shutil.rmtree(_DUMP, ignore_errors=True)


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
