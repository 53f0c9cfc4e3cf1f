r"""The GPU verification in one prepared run: the kernel tests compiled on the GPU, the model's
forms, kernel timing against flash-linear-attention (fla), fla's own kernels in the converter's
parity tests, a train step's throughput and decoding latency. Everything goes to one folder.

  bash experiments/carry/wheels.sh                                # here, with network
  OUT=DIR bash experiments/carry/run.sh python -m experiments.gpu_check   # on the GPU machine
  python -m experiments.gpu_check --dry_run --output_dir=DIR      # anywhere: tiny, on CPU (CI)

Parts, in this order; each is recorded in results.json as ok / failed / skipped with its seconds
and error, and a failure in one never stops the others. A global time budget (--budget_s) gives
each part a share of what is left and skips parts (and a part's remaining items) that would not fit.

  env            versions, devices, the carried distributions missing or with unmet requirements
  kernels        tests/retention_pallas_test.py: compiled on the GPU (the dry run interprets the
                 model-size cases only)
  model          the model's logits in the parallel, chunkwise (kernel and XLA) and recurrent forms
  kernel_timing  experiments/kernel_bench.py's full setting (its --quick one in the dry run)
  fla_parity     tests/convert_fla_test.py with fla's real Triton kernels
                 (RETNET_JAX_FLA_KERNELS=triton; the dry run only collects it)
  train_step     a ~360M-parameter config, T = 2048 and 8192, bfloat16: tokens/s and peak bytes of
                 the chunkwise step with the kernel, with XLA, and of the Transformer
  decode         ms/token at contexts 1k–32k, RetNet against the Transformer

Outputs: results.json (rewritten after every item), table.md, and kernel_timing.png / decode.png
where matplotlib is importable (else `--replot=DIR` draws them from results.json later).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # torch shares the GPU.

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import kernel_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = jnp.float32
FLA_TESTS = 'tests/convert_fla_test.py'
KERNEL_TESTS = 'tests/retention_pallas_test.py'
PART_NAMES = ('env', 'kernels', 'model', 'kernel_timing', 'fla_parity', 'train_step', 'decode')
# The distributions whose versions `env` prints (the machine's and the carried ones).
VERSIONS = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'numpy',
            'scipy', 'ml_dtypes', 'torch', 'triton', 'flax', 'optax', 'orbax-checkpoint', 'chex',
            'grain', 'ml_collections', 'absl-py', 'tensorboardX', 'matplotlib', 'einops',
            'fla-core', 'flash-linear-attention', 'transformers', 'safetensors', 'tokenizers',
            'pytest')


# ------------------------------------------------------------------------------------------------
# Sizes: the GPU run and the dry run differ only here.


FORMS = (('parallel', 'xla'), ('chunkwise', 'pallas'), ('chunkwise', 'xla'), ('recurrent', 'xla'))


@dataclasses.dataclass(frozen=True)
class Sizes:
  kernel_tests: str  # pytest -k expression of the kernel tests ('' for all)
  model: str  # preset of configs/__init__.py for the model-forms check
  model_len: int
  model_dtypes: tuple
  model_forms: tuple  # ((form, impl), ...), the first the one the others are compared with
  timing: kernel_bench.Setting
  train: str  # preset of configs/__init__.py for the train-step config
  train_runs: tuple  # ((seq_len, batch), ...)
  train_steps: int
  train_models: tuple  # of TRAIN_MODELS
  decode_contexts: tuple
  decode_tokens: int
  decode_repeats: int
  decode_models: tuple  # of 'retnet', 'transformer'


GPU = Sizes(
    kernel_tests='',
    model='gpu_model',
    model_len=200, model_dtypes=('float32', 'bfloat16'), model_forms=FORMS,
    timing=kernel_bench.FULL,
    train='gpu_train',  # About 361M parameters: 20 layers of width 1024, a 32k vocabulary.
    train_runs=((2048, 8), (8192, 2)), train_steps=3,
    train_models=('retnet kernel', 'retnet xla', 'transformer'),
    decode_contexts=(1024, 4096, 16384, 32768), decode_tokens=32, decode_repeats=3,
    decode_models=('retnet', 'transformer'))

# The dry run keeps one case of each kind: it checks the plumbing (CI), not the numbers.
DRY = Sizes(
    kernel_tests='model_sizes and float32 and 64',
    model='gpu_model_dry',
    model_len=37, model_dtypes=('float32',), model_forms=(FORMS[0], FORMS[3]),
    timing=kernel_bench.QUICK,
    train='gpu_train_dry',
    train_runs=((32, 2),), train_steps=1, train_models=('transformer',),
    decode_contexts=(16,), decode_tokens=2, decode_repeats=1, decode_models=('retnet',))

# The train-step models: (form, retention impl).
TRAIN_MODELS = {'retnet kernel': ('chunkwise', 'pallas'), 'retnet xla': ('chunkwise', 'xla'),
                'transformer': ('transformer', None)}
# Logits, max |x − ref| / max |ref|, each form against the parallel form.
MODEL_TOLERANCE = {'float32': 1e-4, 'bfloat16': 3e-2}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ------------------------------------------------------------------------------------------------
# The run: parts, budget, outputs.


class Skipped(Exception):
  """A part cannot run here (what it needs is absent); recorded as skipped with the reason."""


class Budget:
  """A global deadline; each part gets a share of what is left (by weight) as its own deadline."""

  WEIGHTS = {'env': 1, 'kernels': 12, 'model': 5, 'kernel_timing': 20, 'fla_parity': 8,
             'train_step': 14, 'decode': 6}
  MIN_SECONDS = {'env': 2, 'kernels': 20, 'model': 10, 'kernel_timing': 30, 'fla_parity': 20,
                 'train_step': 40, 'decode': 20}

  def __init__(self, seconds: float, dry_run: bool):
    self.start, self.seconds, self.dry_run = time.perf_counter(), seconds, dry_run
    self.part_deadline = math.inf

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)

  def open_part(self, name: str, remaining_parts) -> str | None:
    """Sets the part's deadline; returns why it is skipped, or None."""
    left = self.left()
    need = 0 if self.dry_run else self.MIN_SECONDS.get(name, 0)
    if left < need:
      return f'budget: {left:.0f} s left, the part needs about {need} s'
    total = sum(self.WEIGHTS.get(p, 1) for p in remaining_parts)
    self.part_deadline = time.perf_counter() + left * self.WEIGHTS.get(name, 1) / total
    return None

  def part_left(self) -> float:
    return min(self.part_deadline - time.perf_counter(), self.left())


class Check:
  """Runs the parts into `out`: results.json after every item, table.md and plots at the end."""

  def __init__(self, out: str, *, dry_run: bool, budget_s: float, parts=PART_NAMES, log=print):
    self.out, self.dry_run, self.log = out, dry_run, log
    self.sizes = DRY if dry_run else GPU
    self.budget = Budget(budget_s, dry_run)
    self.parts = tuple(parts)
    self.gpu = jax.default_backend() == 'gpu'
    self.interpret = not self.gpu  # The kernels run compiled only on a GPU.
    self.results = {'meta': {'dry_run': dry_run, 'backend': jax.default_backend(),
                             'argv': sys.argv, 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                             'budget_s': budget_s}, 'parts': {}}
    os.makedirs(out, exist_ok=True)

  def save(self):
    self.results['meta']['elapsed_s'] = round(time.perf_counter() - self.budget.start, 1)
    path = os.path.join(self.out, 'results.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(self.results, f, indent=1, default=_jsonable)
    os.replace(path + '.tmp', path)

  def run(self) -> dict:
    unknown = sorted(set(self.parts) - set(PART_NAMES))
    if unknown:
      raise ValueError(f'unknown parts {unknown}; parts are {list(PART_NAMES)}.')
    todo = [p for p in PART_NAMES if p in self.parts]
    for i, name in enumerate(todo):
      record = {'status': 'skipped', 'items': []}
      self.results['parts'][name] = record
      why = self.budget.open_part(name, todo[i:])
      self.log(f'=== [{i + 1}/{len(todo)}] {name} | {self.budget.left():.0f} s of the budget left'
               + (f' | skipped: {why}' if why else ''))
      if why:
        record['reason'] = why
        self.save()
        continue
      t0, cpu0 = time.perf_counter(), time.process_time()
      try:
        getattr(self, f'part_{name}')(record)
        record['status'] = 'failed' if any(it.get('ok') is False for it in record['items']) else 'ok'
      except Skipped as e:
        record['reason'] = str(e)
        self.log(f'{name} skipped: {e}')
      except Exception as e:  # pylint: disable=broad-except
        record['status'] = 'failed'
        record['error'] = f'{type(e).__name__}: {e}'
        record['traceback'] = traceback.format_exc()[-4000:]
        self.log(f'{name} failed: {record["error"]}')
      record['seconds'] = round(time.perf_counter() - t0, 1)
      record['cpu_seconds'] = round(time.process_time() - cpu0, 1)
      self.log(f'=== {name}: {record["status"]} in {record["seconds"]} s '
               f'({record["cpu_seconds"]} s CPU)')
      self.save()
    self.results['meta']['statuses'] = {n: r['status'] for n, r in self.results['parts'].items()}
    self.save()
    write_table(self.results, os.path.join(self.out, 'table.md'))
    self.results['meta']['plots'] = write_plots(self.results, self.out)
    self.save()
    return self.results

  def item(self, record, **fields):
    """Appends one item (a dict) to a part's record and saves."""
    record['items'].append(fields)
    self.save()
    return fields

  def out_of_time(self, record, what: str) -> bool:
    if self.budget.part_left() > 0:
      return False
    record.setdefault('skipped_items', []).append(what)
    self.log(f'  skipped (part budget spent): {what}')
    self.save()
    return True

  # ----------------------------------------------------------------------------------------------
  # env

  def part_env(self, record):
    import importlib.metadata as md  # pylint: disable=g-import-not-at-top
    versions, where = {}, {}
    for name in VERSIONS:
      try:
        dist = md.distribution(name)
        versions[name] = dist.version
        where[name] = str(dist.locate_file(''))
      except md.PackageNotFoundError:
        versions[name] = None
    devices = [{'id': d.id, 'kind': d.device_kind, 'platform': d.platform} for d in jax.devices()]
    info = {'python': platform.python_version(), 'machine': platform.machine(),
            'backend': jax.default_backend(), 'devices': devices, 'versions': versions,
            'carried_site': os.environ.get('CARRY_SITE'), 'wheel_list': wheel_list_status(),
            'unmet_requirements': unmet_requirements()}
    try:
      import torch  # pylint: disable=g-import-not-at-top
      info['torch_cuda'] = bool(torch.cuda.is_available())
      if torch.cuda.is_available():
        info['torch_device'] = torch.cuda.get_device_name(0)
    except ImportError as e:
      info['torch_cuda'] = f'torch not importable: {e}'
    record['info'] = info
    self.results['meta']['device_kind'] = devices[0]['kind'] if devices else None
    for name, version in versions.items():
      self.log(f'  {name:24s} {version or "-"}')
    self.log(f'  devices: {devices}')
    if info['wheel_list']['missing']:
      self.log(f'  carried list, not installed: {info["wheel_list"]["missing"]}')
    if info['unmet_requirements']:
      self.log(f'  unmet requirements: {info["unmet_requirements"]}')

  # ----------------------------------------------------------------------------------------------
  # kernels: Pallas forward and backward against XLA chunkwise and the float64 reference.

  def part_kernels(self, record):
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', KERNEL_TESTS]
    if self.sizes.kernel_tests:
      cmd += ['-k', self.sizes.kernel_tests]
    item = self._pytest(cmd, os.environ)
    item.update(name='kernel tests', compiled=self.gpu)
    item['ok'] = item['ok'] and ' passed' in item['summary']
    self.item(record, **item)
    self.log(f'  pytest {KERNEL_TESTS}: rc {item["returncode"]}: {item["summary"]}')

  def _pytest(self, cmd, env) -> dict:
    timeout = min(max(10.0, self.budget.part_left()), 3600.0)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
      output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      output, rc = f'{e.stdout or ""}{e.stderr or ""}\ntimed out after {timeout:.0f} s', 124
    summary = ([line for line in output.splitlines() if line.strip()][-1:] or [''])[0]
    return {'ok': rc == 0, 'returncode': rc, 'summary': summary, 'output_tail': output[-6000:],
            'seconds': time.perf_counter() - t0}

  # ----------------------------------------------------------------------------------------------
  # model: logits in the three forms.

  def part_model(self, record):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
    from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    T = self.sizes.model_len
    config = load_config(self.sizes.model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.model.vocab_size, (2, T)), jnp.int32)
    segments = np.ones((2, T), np.int32)
    segments[0, T // 3:] = 2  # A document boundary in the first row.
    segments = jnp.asarray(segments)
    params = None
    for dtype in self.sizes.model_dtypes:
      logits = {}
      for form, impl in self.sizes.model_forms:
        if self.out_of_time(record, f'{dtype} {form} {impl}'):
          return
        c = config.copy_and_resolve_references()
        c.model.dtype, c.model.retention_impl = dtype, impl
        cfg = config_lib.model_config(c)
        if params is None:  # One set of parameters (float32) for every dtype and form.
          params = jax.jit(lambda key, cfg=cfg: model_lib.init_params(cfg, key))(jax.random.key(0))
        graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
        forward = jax.jit(lambda params, tokens, segments, graphdef=graphdef, form=form: nnx.merge(
            graphdef, params)(tokens, form=form, segment_ids=segments)[0])
        with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
          logits[f'{form}/{impl}'] = np.asarray(forward(params, tokens, segments), np.float64)
      first = '/'.join(self.sizes.model_forms[0])
      base = logits[first]
      tol = MODEL_TOLERANCE[dtype]
      for key, x in logits.items():
        if key == first:
          continue
        err = rel_err(x, base)
        self.item(record, name=f'{dtype} {key} vs parallel', dtype=dtype, form=key, err=err,
                  tolerance=tol, ok=bool(err <= tol), shape=list(x.shape),
                  compiled=not (self.interpret and key.endswith('pallas')))
        self.log(f'  {dtype} {key:18s} vs parallel: {err:.2e} (tol {tol:.0e})')

  # ----------------------------------------------------------------------------------------------
  # kernel_timing: fla's benchmark setting.

  def part_kernel_timing(self, record):
    deadline = time.perf_counter() + self.budget.part_left()
    results = kernel_bench.run(self.sizes.timing, deadline=deadline, log=self.log)
    record['timing'] = results
    record['items'] = results['items']
    record['skipped_items'] = results['skipped']
    self.log(f'  goal (pallas fwd+bwd ≤ fla chunk at every length): {results["goal"]}')

  # ----------------------------------------------------------------------------------------------
  # fla_parity: the converter's fla tests with fla's real kernels.

  def part_fla_parity(self, record):
    path = os.path.join(ROOT, FLA_TESTS)
    if not os.path.exists(path):
      raise Skipped(f'{FLA_TESTS} is not in this checkout')
    if importlib.util.find_spec('fla') is None:
      raise Skipped('fla is not installed')
    env = dict(os.environ)
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-n', '0', FLA_TESTS]
    if self.gpu:
      env['RETNET_JAX_FLA_KERNELS'] = 'triton'
    else:
      cmd.append('--collect-only')  # The dry run checks the plumbing; CI runs the tests themselves.
    if not _has_xdist():
      cmd.remove('-n'), cmd.remove('0')
    item = self._pytest(cmd, env)
    # On the GPU the tests must have run (they skip without CUDA); the dry run only collects.
    item['ok'] = item['ok'] and (not self.gpu or ' passed' in item['summary'])
    self.item(record, name='fla parity tests', kernels='triton' if self.gpu else
              'collect-only (dry run)', **item)
    rc, summary = item['returncode'], [item['summary']]
    self.log(f'  pytest {FLA_TESTS}: rc {rc}: {summary[0]}')

  # ----------------------------------------------------------------------------------------------
  # train_step: tokens/s and peak memory.

  def part_train_step(self, record):
    from experiments import training_cost  # pylint: disable=g-import-not-at-top
    from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
    from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    base = load_config(self.sizes.train)
    variants = {name: TRAIN_MODELS[name] for name in self.sizes.train_models}
    peak = kernel_bench.peak_flops(self.results['meta'].get('device_kind')) if self.gpu else None
    for T, batch in self.sizes.train_runs:
      for name, (form, impl) in variants.items():
        if self.out_of_time(record, f'{name} T={T}'):
          return
        c = to_transformer(base) if form == 'transformer' else base.copy_and_resolve_references()
        if impl:
          c.model.retention_impl = impl
        cfg = config_lib.model_config(c)
        params = model_lib.count_params(model_lib.abstract_params(cfg))
        item = {'name': f'{name} T={T}', 'model': name, 'T': T, 'batch': batch, 'params': params,
                'attention': 'xla einsum softmax' if form == 'transformer' else None}
        try:
          r = training_cost.time_train_step(c, batch, T, self.sizes.train_steps)
          tps = batch * T / r['seconds_per_step']
          total, _ = training_cost.model_flops_per_token(
              cfg, 'chunkwise' if form != 'transformer' else 'parallel', T)
          item.update(ok=True, tokens_per_s=tps, seconds_per_step=r['seconds_per_step'],
                      compile_s=r['compile_seconds'], peak_bytes=r['peak_bytes'],
                      mfu=None if peak is None else total * tps / peak)
          self.log(f'  {name:14s} T={T:5d} B={batch}: {tps:10.0f} tok/s, peak '
                   f'{(r["peak_bytes"] or 0) / 2**30:.2f} GiB, compile {r["compile_seconds"]:.0f} s')
        except Exception as e:  # pylint: disable=broad-except
          item.update(ok=False, error=f'{type(e).__name__}: {str(e)[:2000]}')
          self.log(f'  {name} T={T}: failed: {item["error"][:300]}')
        self.item(record, **item)

  # ----------------------------------------------------------------------------------------------
  # decode: ms/token against context length.

  def part_decode(self, record):
    from experiments import inference_cost  # pylint: disable=g-import-not-at-top
    base = load_config(self.sizes.train)
    configs = {'retnet': base, 'transformer': to_transformer(base)}
    configs = {name: configs[name] for name in self.sizes.decode_models}
    contexts = list(self.sizes.decode_contexts)
    record['contexts'] = contexts
    for name, config in configs.items():
      for context in contexts:
        if self.out_of_time(record, f'{name} L={context}'):
          return
        try:
          rows = inference_cost.sweep({name: config}, contexts=(context,), batches=(1,),
                                      decode_tokens=self.sizes.decode_tokens,
                                      repeats=self.sizes.decode_repeats, log=lambda s: None)
          for row in rows:
            self.item(record, name=f'{name} L={context}', ok=True,
                      **{k: row[k] for k in ('model', 'context_len', 'batch', 'ms_per_token',
                                             'tokens_per_second', 'state_bytes', 'peak_bytes',
                                             'params') if k in row})
            self.log(f'  {name:12s} L={context:6d}: {row["ms_per_token"]:.3f} ms/token')
        except Exception as e:  # pylint: disable=broad-except
          self.item(record, name=f'{name} L={context}', model=name, context_len=context, ok=False,
                    error=f'{type(e).__name__}: {str(e)[:2000]}')
          self.log(f'  {name} L={context}: failed: {e}')


# ------------------------------------------------------------------------------------------------
# Helpers.


def load_config(preset: str):
  """configs/retnet_tiny.py shrunk by one of the presets of configs/__init__.py, validated."""
  from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load(os.path.join(ROOT, 'configs', f'retnet_tiny.py:{preset}'))
  config_lib.validate(c)
  return c


def to_transformer(config):
  """The parameter-matched Transformer of a RetNet config (configs/transformer_tiny.py's rule)."""
  from configs import transformer_tiny  # pylint: disable=g-import-not-at-top
  return transformer_tiny.to_transformer(config.copy_and_resolve_references())


def _has_xdist() -> bool:
  return importlib.util.find_spec('xdist') is not None


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ------------------------------------------------------------------------------------------------
# The carried wheels.


def read_wheel_list(path=None) -> dict[str, str]:
  """{name: version} of a pin file (default experiments/carry/wheels.txt)."""
  path = path or os.path.join(ROOT, 'experiments', 'carry', 'wheels.txt')
  out = {}
  with open(path) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        name, sep, version = line.partition('==')
        if not sep:
          raise ValueError(f'{path}: {line!r} is not name==version.')
        if _canonical(name) in out:
          raise ValueError(f'{path}: {name} is listed twice.')
        out[_canonical(name)] = version.strip()
  return out


def wheel_list_names(kind: str, path=None) -> list[str]:
  """The names of the list's '# KIND: a b c -- why' comment lines (ROOTS, MACHINE, SKIP)."""
  path = path or os.path.join(ROOT, 'experiments', 'carry', 'wheels.txt')
  names = []
  with open(path) as f:
    for line in f:
      if line.startswith(f'# {kind}:'):
        names += [_canonical(n) for n in line.split(':', 1)[1].split('--')[0].split()]
  return names


def _canonical(name: str) -> str:
  return '-'.join(name.replace('_', '-').replace('.', '-').lower().split('-'))


def wheel_list_status() -> dict:
  """Which listed distributions are installed, and at another version than listed."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  missing, other = [], {}
  try:
    listed = read_wheel_list()
  except OSError as e:
    return {'error': str(e), 'missing': [], 'other_version': {}}
  for name, version in listed.items():
    try:
      have = md.version(name)
    except md.PackageNotFoundError:
      missing.append(name)
      continue
    if have != version:
      other[name] = have
  return {'missing': missing, 'other_version': other}


def unmet_requirements() -> list[str]:
  """'dist: requirement' for every requirement of the listed distributions that is not met,
  except those the list leaves out on purpose (its SKIP lines)."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  try:
    from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ['(packaging not importable: not checked)']
  out = []
  try:
    listed = read_wheel_list()
    skipped = set(wheel_list_names('SKIP'))
  except OSError:
    return out
  for name in listed:
    try:
      dist = md.distribution(name)
    except md.PackageNotFoundError:
      continue
    for text in dist.requires or ():
      req = Requirement(text)
      if req.marker is not None and not req.marker.evaluate({'extra': ''}):
        continue
      if _canonical(req.name) in skipped:
        continue
      try:
        have = md.version(req.name)
      except md.PackageNotFoundError:
        out.append(f'{name}: {text} (absent)')
        continue
      if req.specifier and not req.specifier.contains(have, prereleases=True):
        out.append(f'{name}: {text} (have {have})')
  return out


# ------------------------------------------------------------------------------------------------
# table.md and plots.


def _f(x, fmt='{:.3g}'):
  return '–' if x is None else fmt.format(x)


def write_table(results: dict, path: str) -> str:
  meta, parts = results['meta'], results['parts']
  lines = [f'# GPU check{" (dry run: tiny shapes, CPU, interpreted kernels)" if meta["dry_run"] else ""}',
           '', f'Backend {meta["backend"]}, device {meta.get("device_kind")}, started '
           f'{meta["started"]}, {meta.get("elapsed_s")} s of a {meta["budget_s"]} s budget.', '',
           '| part | status | seconds | note |', '|---|---|---:|---|']
  for name, r in parts.items():
    note = r.get('reason') or r.get('error') or ''
    if r.get('skipped_items'):
      note += f' skipped items: {", ".join(r["skipped_items"][:4])}'
    lines.append(f'| {name} | {r["status"]} | {_f(r.get("seconds"), "{:.0f}")} | '
                 f'{note[:200].replace("|", "/")} |')
  k = parts.get('kernels', {}).get('items', [])
  if k:
    lines += ['', f'## Kernel tests ({KERNEL_TESTS}, compiled: {k[0].get("compiled")})', '',
              k[0].get('summary', '')]
  m = [it for it in parts.get('model', {}).get('items', []) if 'form' in it]
  if m:
    lines += ['', '## Model logits, each form against the parallel form', '',
              '| dtype | form/impl | rel err | tol | ok |', '|---|---|---:|---:|---|']
    lines += [f'| {it["dtype"]} | {it["form"]} | {it["err"]:.1e} | {it["tolerance"]:.0e} | '
              f'{it["ok"]} |' for it in m]
  timing = parts.get('kernel_timing', {}).get('timing')
  if timing:
    lines += ['', '## Kernel time', '', kernel_bench.table(timing)]
  fp = parts.get('fla_parity', {}).get('items', [])
  if fp:
    lines += ['', f'## fla parity ({FLA_TESTS})', '',
              f'{fp[0].get("kernels", "")}: {fp[0].get("summary") or fp[0].get("reason")}']
  tr = [it for it in parts.get('train_step', {}).get('items', []) if 'model' in it]
  if tr:
    lines += ['', '## Train step (bf16, AdamW, synthetic tokens)', '',
              '| model | T | batch | params | tokens/s | peak GiB | MFU | compile s |',
              '|---|---:|---:|---:|---:|---:|---:|---:|']
    for it in tr:
      lines.append(f'| {it["model"]} | {it["T"]} | {it["batch"]} | {it["params"] / 1e6:.0f}M | '
                   f'{_f(it.get("tokens_per_s"), "{:.0f}")} | '
                   f'{_f(None if it.get("peak_bytes") is None else it["peak_bytes"] / 2**30, "{:.2f}")} | '
                   f'{_f(it.get("mfu"), "{:.2f}")} | {_f(it.get("compile_s"), "{:.0f}")} |'
                   + ('' if it.get('ok') else f' failed: {it.get("error", "")[:100]}'))
    lines.append('The Transformer attends with XLA einsum-softmax (no cuDNN attention option in '
                 'the model yet).')
  dec = [it for it in parts.get('decode', {}).get('items', []) if 'context_len' in it]
  if dec:
    lines += ['', '## Decoding, batch 1 (ms/token)', '', '| context | retnet | transformer |',
              '|---:|---:|---:|']
    for L in sorted({it['context_len'] for it in dec}):
      cell = lambda name: next((_f(it.get('ms_per_token'), '{:.3f}') for it in dec
                                if it['context_len'] == L and it['model'] == name), '–')
      lines.append(f'| {L} | {cell("retnet")} | {cell("transformer")} |')
  text = '\n'.join(lines) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def write_plots(results: dict, out: str) -> list[str] | str:
  """kernel_timing.png and decode.png; the reason instead where matplotlib is not importable."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'matplotlib not importable: run `python -m experiments.gpu_check --replot=DIR` later'
  written = []
  timed = [it for it in results['parts'].get('kernel_timing', {}).get('items', []) if 'ms' in it]
  if timed:
    modes = [m for m in ('fwd', 'fwd+bwd') if any(it['mode'] == m for it in timed)]
    fig = Figure(figsize=(5.5 * len(modes), 4.2), layout='constrained')
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
      for impl in dict.fromkeys(it['impl'] for it in timed):
        pts = sorted((it['T'], it['ms']) for it in timed if it['impl'] == impl and it['mode'] == mode)
        if pts:
          ax.plot(*zip(*pts), 'o-', label=impl)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel('sequence length T')
      ax.set_ylabel('ms')
      st = results['parts']['kernel_timing'].get('timing', {}).get('setting', {})
      ax.set_title(f'{mode} (B={st.get("B")}, H={st.get("H")}, K=V={st.get("D")}, bf16)')
      ax.grid(alpha=0.3)
      ax.legend(fontsize='small')
    path = os.path.join(out, 'kernel_timing.png')
    fig.savefig(path, dpi=110)
    written.append(path)
  dec = [it for it in results['parts'].get('decode', {}).get('items', []) if it.get('ok')]
  if dec:
    fig = Figure(figsize=(6, 4.2), layout='constrained')
    ax = fig.subplots()
    for name in dict.fromkeys(it['model'] for it in dec):
      pts = sorted((it['context_len'], it['ms_per_token']) for it in dec if it['model'] == name)
      ax.plot(*zip(*pts), 'o-', label=name)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('context length')
    ax.set_ylabel('ms / token (batch 1)')
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out, 'decode.png')
    fig.savefig(path, dpi=110)
    written.append(path)
  return written


# ------------------------------------------------------------------------------------------------
# Entry point.


def check(output_dir: str, *, dry_run: bool, budget_s: float | None = None, parts=PART_NAMES,
          log=print) -> int:
  """Runs the check into `output_dir`; 0 when no part failed, 2 otherwise, 1 for bad arguments."""
  budget = budget_s if budget_s is not None else (1e9 if dry_run else 420.0)
  if not dry_run and jax.default_backend() != 'gpu':
    print(f'error: no GPU (backend {jax.default_backend()!r}); use --dry_run on a CPU.',
          file=sys.stderr)
    return 1
  try:
    results = Check(output_dir, dry_run=dry_run, budget_s=budget, parts=parts, log=log).run()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  statuses = results['meta']['statuses']
  log(f'done in {results["meta"]["elapsed_s"]} s: {statuses}; see '
      f'{os.path.join(output_dir, "table.md")}')
  return 0 if all(s != 'failed' for s in statuses.values()) else 2


def define_flags() -> dict:
  return dict(
      output_dir=flags.DEFINE_string('output_dir', None, 'Output folder ($OUT when set).'),
      dry_run=flags.DEFINE_bool('dry_run', False, 'Tiny shapes on CPU, interpreted kernels.'),
      budget_s=flags.DEFINE_float(
          'budget_s', None, 'Global time budget in seconds (default: $CARRY_BUDGET_S, else 420; '
          'the dry run none).'),
      parts=flags.DEFINE_list('parts', list(PART_NAMES), 'The parts to run.'),
      replot=flags.DEFINE_string('replot', None,
                                 'Only redraw table.md and the plots of this folder.'))


def main(argv, fl) -> int:
  del argv
  if fl['replot'].value:
    with open(os.path.join(fl['replot'].value, 'results.json')) as f:
      results = json.load(f)
    write_table(results, os.path.join(fl['replot'].value, 'table.md'))
    print(write_plots(results, fl['replot'].value))
    return 0
  output_dir = os.environ.get('OUT') or fl['output_dir'].value
  if not output_dir:
    raise app.UsageError('--output_dir is required (or set $OUT).')
  budget_s = fl['budget_s'].value
  if budget_s is None and os.environ.get('CARRY_BUDGET_S'):  # Under experiments/carry/run.sh.
    budget_s = float(os.environ['CARRY_BUDGET_S'])
  return check(output_dir, dry_run=fl['dry_run'].value, budget_s=budget_s,
               parts=fl['parts'].value,
               log=lambda s: print(s, flush=True))


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: sys.exit(main(argv, _flags)))
