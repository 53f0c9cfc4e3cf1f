r"""The GPU verification in one prepared run: kernels correct and timed against flash-linear-attention
(fla), a train step's throughput, decoding latency. Under 8 minutes; everything goes to one folder.

  bash experiments/gpu_wheels.sh                 # here, with network: the wheels into .whl/
  bash experiments/gpu_check.sh                  # on the GPU machine: installs .whl/, runs this
  python -m experiments.gpu_check --dry_run --out=DIR   # anywhere: tiny shapes on CPU (CI)

Parts, in this order; each is recorded in results.json as ok / failed / skipped with its seconds
and error, and a failure in one never stops the others. A global time budget (--budget_s) gives
each part a share of what is left and skips parts (and a part's remaining items) that would not fit.

  env            versions, devices, the distributions this machine lacks or has unmet
  kernels        Pallas forward and backward (compiled; interpreted in the dry run) against the XLA
                 chunkwise form and a float64 NumPy reference written from eq. 5 (`reference`):
                 K = V = 64 and 128, bfloat16 and float32, resets, a ragged T, an initial state
  model          the model's logits in the parallel, chunkwise (kernel and XLA) and recurrent forms
  kernel_timing  fla's benchmark setting (B = 8, H = 32, K = V = 128, bfloat16, T = 2k–16k): our
                 kernel, our XLA chunkwise form, fla's chunk_retention and fused_chunk_retention and
                 jax.nn.dot_product_attention (cuDNN), forward and forward+backward; warm-up, then
                 the median of repeats; TFLOP/s and the fraction of the bfloat16 peak
  fla_parity     tests/convert_fla_test.py with fla's real Triton kernels
                 (RETNET_JAX_FLA_KERNELS=triton; the dry run only collects it)
  train_step     a ~360M-parameter config, T = 2048 and 8192, bfloat16: tokens/s and peak bytes of
                 the chunkwise step with the kernel, with XLA, and of the Transformer
  decode         ms/token at contexts 1k–32k, RetNet against the Transformer

Outputs: results.json (rewritten after every item), table.md, and kernel_timing.png / decode.png
where matplotlib is importable (else `--replot=DIR` draws them from results.json later).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # torch shares the GPU.

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = jnp.float32
# H200 SXM dense bfloat16 (spec); large GEMMs reach about 790 in practice.
PEAK_BF16_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12}
PRACTICAL_NOTE = ('H200 dense bf16 peak 989 TFLOP/s (spec); large bf16 GEMMs measure about 790 '
                  'TFLOP/s in practice (≈ 0.8 of the spec).')
FLA_A100_MS = {2048: 6.06, 8192: 23.95, 16384: 48.75}  # fla's README, chunk retention fwd+bwd.
FLA_TESTS = 'tests/convert_fla_test.py'
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
  check_dims: tuple  # K = V of the kernel correctness cases
  check_dtypes: tuple
  check_shape: tuple  # (B, H, T, chunk) of the correctness cases; T is ragged on purpose
  model: dict  # config overrides of the model-forms check
  model_len: int
  model_dtypes: tuple
  model_forms: tuple  # ((form, impl), ...), the first the one the others are compared with
  timing: tuple  # (B, H, K = V)
  timing_lens: tuple
  timing_modes: tuple  # of 'fwd', 'fwd+bwd'
  timing_ours: tuple  # of 'pallas', 'xla', 'cudnn_attention'
  warmup: int
  repeats: int
  train: dict  # config overrides of the train-step config
  train_runs: tuple  # ((seq_len, batch), ...)
  train_steps: int
  train_models: tuple  # of TRAIN_MODELS
  decode_contexts: tuple
  decode_tokens: int
  decode_repeats: int
  decode_models: tuple  # of 'retnet', 'transformer'


GPU = Sizes(
    # The benchmark's K = 128 in bf16 first: a part out of time drops the last cases.
    check_dims=(128, 64), check_dtypes=('bfloat16', 'float32'), check_shape=(2, 4, 300, 64),
    model={'model.num_layers': 2, 'model.embed_dim': 256, 'model.num_heads': 2,
           'model.value_dim': 512, 'model.ffn_dim': 512, 'model.chunk_size': 64},
    model_len=200, model_dtypes=('float32', 'bfloat16'), model_forms=FORMS,
    timing=(8, 32, 128), timing_lens=(2048, 4096, 8192, 16384),
    timing_modes=('fwd', 'fwd+bwd'), timing_ours=('pallas', 'xla', 'cudnn_attention'), warmup=2, repeats=10,
    # About 361M parameters: 20 layers of width 1024, K = 128, V = 256, a 32k vocabulary.
    train={'model.num_layers': 20, 'model.embed_dim': 1024, 'model.num_heads': 8,
           'model.value_dim': 2048, 'model.ffn_dim': 2048, 'model.vocab_size': 32768,
           'model.chunk_size': 64, 'model.dtype': 'bfloat16', 'model.remat': 'dots_no_batch',
           'reset_at_doc_boundaries': False},
    train_runs=((2048, 8), (8192, 2)), train_steps=3,
    train_models=('retnet kernel', 'retnet xla', 'transformer'),
    decode_contexts=(1024, 4096, 16384, 32768), decode_tokens=32, decode_repeats=3,
    decode_models=('retnet', 'transformer'))

# The dry run keeps one case of each kind: it checks the plumbing (CI), not the numbers.
DRY = Sizes(
    check_dims=(16,), check_dtypes=('float32',), check_shape=(1, 2, 37, 16),
    model={'model.num_layers': 1, 'model.embed_dim': 64, 'model.num_heads': 2,
           'model.value_dim': 128, 'model.ffn_dim': 128, 'model.chunk_size': 16},
    model_len=37, model_dtypes=('float32',), model_forms=(FORMS[0], FORMS[3]),
    timing=(1, 2, 16), timing_lens=(64,), timing_modes=('fwd+bwd',),
    timing_ours=('pallas',), warmup=1, repeats=2,
    train={'model.num_layers': 1, 'model.embed_dim': 64, 'model.num_heads': 2,
           'model.value_dim': 128, 'model.ffn_dim': 128, 'model.chunk_size': 16,
           'model.dtype': 'bfloat16', 'model.remat': 'dots_no_batch',
           'reset_at_doc_boundaries': False},
    train_runs=((32, 2),), train_steps=1, train_models=('transformer',),
    decode_contexts=(16,), decode_tokens=2, decode_repeats=1, decode_models=('retnet',))

# The train-step models: (form, retention impl).
TRAIN_MODELS = {'retnet kernel': ('chunkwise', 'pallas'), 'retnet xla': ('chunkwise', 'xla'),
                'transformer': ('transformer', None)}
# Tolerances: max |x − ref| / max |ref| per tensor, against the float64 reference of the same
# (dtype-rounded) inputs.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 3e-2}
MODEL_TOLERANCE = 1e-4  # float32 logits, each form against the parallel form.


# ------------------------------------------------------------------------------------------------
# The float64 reference (eq. 5 with the state and reset masks), forward and backward.


def reference(q, k, v, gamma, state, reset, do, dstate):
  """Float64 NumPy retention and the gradients of L = ⟨dO, O⟩ + ⟨dS, S_T⟩.

  With seg_t the number of resets at or before t, M_ts = γ^{t−s} [s ≤ t, seg_s = seg_t],
  P = Q Kᵀ, w_t = γ^{t+1} [seg_t = 0], u_s = γ^{T−1−s} [seg_s = seg_{T−1}], c = γ^T [seg_{T−1} = 0]:
      O = (P ⊙ M) V + w ⊙ (Q S_0),        S_T = Σ_s u_s k_sᵀ v_s + c S_0                   (eq. 5)
      dQ = (dO Vᵀ ⊙ M) K + w ⊙ (dO S_0ᵀ),  dK = (dO Vᵀ ⊙ M)ᵀ Q + u ⊙ (V dSᵀ)
      dV = (P ⊙ M)ᵀ dO + u ⊙ (K dS),       dS_0 = Σ_t w_t q_tᵀ dO_t + c dS
  and d log γ from the exponents (t − s, t + 1, T − 1 − s, T) of each term.
  Shapes: q, k [B, T, H, K]; v, do [B, T, H, V]; gamma [H]; state, dstate [B, H, K, V]; reset [B, T].
  Returns ((o, S_T), (dq, dk, dv, dlog_gamma, dstate_in)).
  """
  q, k, v, do, state, dstate = (np.asarray(x, np.float64) for x in (q, k, v, do, state, dstate))
  lg = np.log(np.asarray(gamma, np.float64))
  B, T, H, _ = q.shape
  seg = np.cumsum(np.asarray(reset, bool), axis=1)
  t = np.arange(T, dtype=np.float64)
  diff = t[:, None] - t[None, :]
  same = (seg[:, :, None] == seg[:, None, :]) & (diff >= 0)[None]
  M = np.exp(np.maximum(diff, 0)[None, None] * lg[None, :, None, None]) * same[:, None]  # [B,H,T,T]
  w = np.exp((t + 1)[None, :, None] * lg) * (seg == 0)[..., None]  # [B, T, H]
  u = np.exp((T - 1 - t)[None, :, None] * lg) * (seg == seg[:, -1:])[..., None]
  c = np.exp(T * lg)[None] * (seg[:, -1] == 0)[:, None]  # [B, H]
  P = np.einsum('bthk,bshk->bhts', q, k)
  qs = np.einsum('bthk,bhkv->bthv', q, state)
  o = np.einsum('bhts,bshv->bthv', P * M, v) + w[..., None] * qs
  final = np.einsum('bsh,bshk,bshv->bhkv', u, k, v) + c[..., None, None] * state
  dov = np.einsum('bthv,bshv->bhts', do, v)
  dq = np.einsum('bhts,bshk->bthk', dov * M, k) + w[..., None] * np.einsum('bthv,bhkv->bthk', do, state)
  dk = np.einsum('bhts,bthk->bshk', dov * M, q) + u[..., None] * np.einsum('bshv,bhkv->bshk', v, dstate)
  dv = np.einsum('bhts,bthv->bshv', P * M, do) + u[..., None] * np.einsum('bshk,bhkv->bshv', k, dstate)
  ds0 = np.einsum('bth,bthk,bthv->bhkv', w, q, do) + c[..., None, None] * dstate
  kv_dot = np.einsum('bshk,bshv,bhkv->bsh', k, v, dstate)
  dlg = (np.einsum('bhts,ts->h', dov * P * M, diff * (diff >= 0))
         + np.einsum('bth,t->h', w * np.einsum('bthv,bthv->bth', do, qs), t + 1)
         + np.einsum('bsh,s->h', u * kv_dot, T - 1 - t)
         + T * np.einsum('bh,bhkv,bhkv->h', c, dstate, state))
  return (o, final), (dq, dk, dv, dlg, ds0)


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
            'carried_site': os.environ.get('GPU_CHECK_SITE'), 'wheel_list': wheel_list_status(),
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
    from retnet_jax import retention  # pylint: disable=g-import-not-at-top
    from retnet_jax import retention_pallas  # pylint: disable=g-import-not-at-top
    B, H, T, C = self.sizes.check_shape
    for dim in self.sizes.check_dims:
      for dtype in self.sizes.check_dtypes:
        name = f'K=V={dim} {dtype}'
        if self.out_of_time(record, name):
          return
        rng = np.random.default_rng(dim)
        dt = jnp.dtype(dtype)
        cast = lambda x: np.asarray(jnp.asarray(x, dt).astype(F32))  # The dtype's rounding.
        q, k = (cast(rng.standard_normal((B, T, H, dim)) * dim**-0.5) for _ in range(2))
        v, do = (cast(rng.standard_normal((B, T, H, dim))) for _ in range(2))
        s0, ds = (rng.standard_normal((B, H, dim, dim)).astype(np.float32) * 0.1 for _ in range(2))
        gamma = 1 - 2.0 ** (-5.0 - np.arange(H))
        reset = rng.random((B, T)) < 0.02
        reset[:, 0] = False
        reset[0, C // 2] = True  # One reset inside the first chunk, one at a chunk start.
        reset[-1, C] = True
        (o_ref, s_ref), grads_ref = reference(q, k, v, gamma, s0, reset, do, ds)
        args = (*(jnp.asarray(x, dt) for x in (q, k, v)), jnp.asarray(np.log(gamma), F32),
                jnp.asarray(s0))
        cot = (jnp.asarray(do, dt), jnp.asarray(ds))
        reset_j = jnp.asarray(reset)
        impls = {
            'pallas': lambda *a: retention_pallas.chunkwise(*a, reset=reset_j, chunk_size=C,
                                      target='gpu', interpret=self.interpret),
            'xla': lambda *a: retention.chunkwise(*a, reset=reset_j, chunk_size=C),
        }
        outs = {}
        t0 = time.perf_counter()
        precision = 'highest' if dtype == 'float32' else 'default'
        with jax.default_matmul_precision(precision):
          for impl, fn in impls.items():
            @jax.jit
            def fwd_bwd(args, cot, fn=fn):
              out, vjp = jax.vjp(fn, *args)
              return out, vjp(cot)
            (o, s), grads = fwd_bwd(args, cot)
            outs[impl] = jax.device_get(((o, s), grads))
        errs = {}
        names = ('o', 'state', 'dq', 'dk', 'dv', 'dlog_gamma', 'dstate')
        refs = (o_ref, s_ref, *grads_ref)
        for impl, ((o, s), grads) in outs.items():
          for n, x, ref in zip(names, (o, s, *grads), refs):
            errs[f'{impl}_vs_f64_{n}'] = rel_err(x, ref)
        for n, x, y in zip(names, (*outs['pallas'][0], *outs['pallas'][1]),
                           (*outs['xla'][0], *outs['xla'][1])):
          errs[f'pallas_vs_xla_{n}'] = rel_err(x, y)
        worst = max(v for k_, v in errs.items() if k_.startswith('pallas_vs_f64'))
        ok = bool(worst <= TOLERANCE[dtype])
        self.item(record, name=name, dim=dim, dtype=dtype, shape=[B, T, H, dim], chunk=C,
                  resets=int(reset.sum()), compiled=not self.interpret, ok=ok, worst=worst,
                  tolerance=TOLERANCE[dtype], errors=errs, seconds=time.perf_counter() - t0)
        self.log(f'  {name}: pallas vs float64 worst {worst:.2e} (tol {TOLERANCE[dtype]:.0e}) '
                 f'{"ok" if ok else "FAIL"}; xla vs float64 worst '
                 f'{max(v for k_, v in errs.items() if k_.startswith("xla_vs_f64")):.2e}')

  # ----------------------------------------------------------------------------------------------
  # model: logits in the three forms.

  def part_model(self, record):
    from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
    from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    T = self.sizes.model_len
    config = load_config('retnet_tiny', self.sizes.model)
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
      tol = MODEL_TOLERANCE if dtype == 'float32' else TOLERANCE['bfloat16']
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
    from retnet_jax import retention  # pylint: disable=g-import-not-at-top
    from retnet_jax import retention_pallas  # pylint: disable=g-import-not-at-top
    B, H, D = self.sizes.timing
    C = 64 if not self.dry_run else 16
    peak, peak_name = peak_flops(self.results['meta'].get('device_kind'), self.gpu)
    record['peak_flops'], record['peak_name'] = peak, peak_name
    record['setting'] = {'B': B, 'H': H, 'K': D, 'V': D, 'dtype': 'bfloat16', 'chunk': C,
                         'warmup': self.sizes.warmup, 'repeats': self.sizes.repeats}
    log_gamma = jnp.asarray(np.log(1 - 2.0 ** (-5.0 - np.arange(H))), F32)  # fla's γ_h.
    scale = D**-0.5
    # Retention takes q already scaled by K^-1/2 (fla scales inside its kernels); attention scales.
    ours = {
        'pallas': lambda q, k, v: retention_pallas.chunkwise(q, k, v, log_gamma,
                                       chunk_size=C, target='gpu', interpret=self.interpret)[0],
        'xla': lambda q, k, v: retention.chunkwise(q, k, v, log_gamma, chunk_size=C)[0],
        'cudnn_attention': lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation='cudnn' if self.gpu else None),
    }
    fla = fla_ops(self.dry_run)
    record['fla_impls'] = sorted(fla) if isinstance(fla, dict) else fla
    for T in self.sizes.timing_lens:
      rng = np.random.default_rng(T)
      host = [rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(4)]
      q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in host)
      q_scaled = (q * scale).astype(jnp.bfloat16)
      outputs = {}
      for impl in self.sizes.timing_ours:
        fn = ours[impl]
        qi = q if impl == 'cudnn_attention' else q_scaled
        for mode in self.sizes.timing_modes:
          if self.out_of_time(record, f'T={T} {impl} {mode}'):
            return
          item = {'T': T, 'impl': impl, 'mode': mode}
          try:
            if mode == 'fwd':
              jitted = jax.jit(fn)
              call_ = lambda jitted=jitted, qi=qi: jitted(qi, k, v)
            else:
              def fwd_bwd(q, k, v, do, fn=fn):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(do)
              jitted = jax.jit(fwd_bwd)
              call_ = lambda jitted=jitted, qi=qi: jitted(qi, k, v, do)[0]
            t0 = time.perf_counter()
            out = jax.block_until_ready(call_())
            item['first_call_s'] = time.perf_counter() - t0
            if impl != 'cudnn_attention' and impl not in outputs:
              outputs[impl] = np.asarray(out[:, :min(T, 512)], np.float32)
            item.update(time_calls(lambda: jax.block_until_ready(call_()), self.sizes.warmup,
                                   self.sizes.repeats))
          except Exception as e:  # pylint: disable=broad-except
            item.update(ok=False, error=f'{type(e).__name__}: {str(e)[:2000]}')
          self._timing_item(record, item, B, H, D, C, peak)
      if isinstance(fla, dict):
        outputs.update(self._time_fla(record, fla, host, B, H, D, C, T, peak))
      if 'pallas' in outputs:
        for other in ('xla', *(f for f in outputs if f.startswith('fla_'))):
          if other in outputs:
            err = rel_err(outputs['pallas'], outputs[other])
            self.item(record, name=f'T={T} pallas vs {other} output', T=T, kind='agreement',
                      other=other, err=err, ok=bool(err <= TOLERANCE['bfloat16']),
                      tolerance=TOLERANCE['bfloat16'])
      del q, k, v, do, q_scaled
    record['goal'] = goal(record['items'])
    self.log(f'  goal (pallas fwd+bwd ≤ fla chunk at every length): {record["goal"]}')

  def _time_fla(self, record, fla, host, B, H, D, C, T, peak) -> dict:
    import torch  # pylint: disable=g-import-not-at-top
    device = 'cuda' if self.gpu and torch.cuda.is_available() else 'cpu'
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    q, k, v, do = (torch.tensor(x, dtype=torch.bfloat16, device=device) for x in host)
    outputs = {}
    for impl, fn in fla.items():
      for mode in self.sizes.timing_modes:
        if self.out_of_time(record, f'T={T} {impl} {mode}'):
          return outputs
        item = {'T': T, 'impl': impl, 'mode': mode}
        try:
          if mode == 'fwd':
            def run(fn=fn):
              with torch.no_grad():
                out = fn(q, k, v)
              sync()
              return out
          else:
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def run(fn=fn, qg=qg, kg=kg, vg=vg):
              for x in (qg, kg, vg):
                x.grad = None
              out = fn(qg, kg, vg)
              out.backward(do)
              sync()
              return out.detach()
          t0 = time.perf_counter()
          out = run()
          item['first_call_s'] = time.perf_counter() - t0
          if impl not in outputs:
            outputs[impl] = out[:, :min(T, 512)].float().cpu().numpy()
          item.update(time_calls(run, self.sizes.warmup, self.sizes.repeats))
        except Exception as e:  # pylint: disable=broad-except
          item.update(ok=False, error=f'{type(e).__name__}: {str(e)[:2000]}')
        self._timing_item(record, item, B, H, D, C, peak)
    del q, k, v, do
    if device == 'cuda':
      torch.cuda.empty_cache()
    return outputs

  def _timing_item(self, record, item, B, H, D, C, peak):
    if 'median_s' in item:
      flops = timing_flops(item['impl'], item['mode'], B, H, item['T'], D, C)
      item['ms'] = 1e3 * item['median_s']
      item['flops'] = flops
      item['tflops'] = flops / item['median_s'] / 1e12
      item['peak_fraction'] = None if peak is None else flops / item['median_s'] / peak
      self.log(f'  T={item["T"]:6d} {item["impl"]:22s} {item["mode"]:8s} {item["ms"]:9.3f} ms '
               f'{item["tflops"]:7.1f} TFLOP/s' + ('' if peak is None else
                                                    f' ({100 * item["peak_fraction"]:.0f}% of peak)'))
    else:
      self.log(f'  T={item["T"]:6d} {item["impl"]:22s} {item["mode"]:8s} failed: '
               f'{item.get("error", "")[:300]}')
    item['name'] = f'T={item["T"]} {item["impl"]} {item["mode"]}'
    self.item(record, **item)

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
    timeout = min(max(10.0, self.budget.part_left()), 3600.0)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
      output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      output, rc = f'{e.stdout or ""}{e.stderr or ""}\ntimed out after {timeout:.0f} s', 124
    summary = [line for line in output.splitlines() if line.strip()][-1:] or ['']
    # On the GPU the tests must have run (they skip without CUDA); the dry run only collects.
    ok = rc == 0 and (not self.gpu or ' passed' in summary[0])
    self.item(record, name='fla parity tests', ok=ok, returncode=rc,
              kernels='triton' if self.gpu else 'collect-only (dry run)', summary=summary[0],
              output_tail=output[-6000:], seconds=time.perf_counter() - t0)
    self.log(f'  pytest {FLA_TESTS}: rc {rc}: {summary[0]}')

  # ----------------------------------------------------------------------------------------------
  # train_step: tokens/s and peak memory.

  def part_train_step(self, record):
    from experiments import training_cost  # pylint: disable=g-import-not-at-top
    from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
    from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    base = load_config('retnet_tiny', self.sizes.train)
    variants = {name: TRAIN_MODELS[name] for name in self.sizes.train_models}
    peak, _ = peak_flops(self.results['meta'].get('device_kind'), self.gpu)
    for T, batch in self.sizes.train_runs:
      for name, (form, impl) in variants.items():
        if self.out_of_time(record, f'{name} T={T}'):
          return
        c = to_transformer(base) if form == 'transformer' else base.copy_and_resolve_references()
        if impl:
          c.model.retention_impl = impl
        cfg = config_lib.model_config(c)
        params = model_lib.count_params(jax.eval_shape(
            lambda cfg=cfg: _abstract_params(cfg)))
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
    base = load_config('retnet_tiny', self.sizes.train)
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


def _abstract_params(cfg):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  return nnx.state(model_lib.Model(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def load_config(name: str, overrides: dict):
  """configs/<name>.py with 'a.b' overrides (values, not strings), validated."""
  from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load(os.path.join(ROOT, 'configs', f'{name}.py'))
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(c)
  return c


def to_transformer(config):
  """The parameter-matched Transformer of a RetNet config (configs/transformer_tiny.py's rule)."""
  spec = importlib.util.spec_from_file_location(
      'transformer_tiny', os.path.join(ROOT, 'configs', 'transformer_tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.to_transformer(config.copy_and_resolve_references())


def fla_ops(dry_run: bool):
  """{name: fn(q, k, v) -> o} of fla's retention kernels ([B, T, H, K] layout), or why not.

  On a GPU: fla's Triton chunk_retention and fused_chunk_retention. In the dry run: fla's torch
  reference (fla.ops.retention.naive), under both names, so the same code path runs.
  """
  try:
    if dry_run:
      from fla.ops.retention.naive import naive_retention  # pylint: disable=g-import-not-at-top
      naive = lambda q, k, v: naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
      return {'fla_chunk (naive, dry run)': naive, 'fla_fused_chunk (naive, dry run)': naive}
    from fla.ops.retention import chunk_retention  # pylint: disable=g-import-not-at-top
    from fla.ops.retention import fused_chunk_retention  # pylint: disable=g-import-not-at-top
    return {'fla_chunk': lambda q, k, v: chunk_retention(q, k, v)[0],
            'fla_fused_chunk': lambda q, k, v: fused_chunk_retention(q, k, v)[0]}
  except Exception as e:  # pylint: disable=broad-except
    return f'fla not importable: {type(e).__name__}: {e}'


def time_calls(run, warmup: int, repeats: int) -> dict:
  """Warm-up calls, then the median (and min, max) of `repeats` timed calls; run() must sync."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return {'ok': True, 'median_s': statistics.median(times), 'min_s': min(times),
          'max_s': max(times), 'repeats': repeats}


def timing_flops(impl: str, mode: str, B, H, T, D, C) -> float:
  """Matmul FLOPs: retention's chunkwise form B·H·T·(2C(K+V) + 4KV) forward (eq. 7), backward
  twice that; causal attention 2·B·H·T²·D forward (half of 4·B·H·T²·D), backward 2.5× that
  (FlashAttention's count, which recomputes the scores)."""
  if 'attention' in impl:
    fwd = 2.0 * B * H * T * T * D
    return fwd if mode == 'fwd' else 3.5 * fwd
  fwd = B * H * T * (2.0 * C * (D + D) + 4.0 * D * D)
  return fwd if mode == 'fwd' else 3.0 * fwd


def peak_flops(device_kind, gpu: bool):
  if not gpu or not device_kind:
    return None, None
  for name, flops in PEAK_BF16_FLOPS.items():
    if name.lower() in str(device_kind).lower():
      return flops, name
  return None, None


def goal(items) -> dict:
  """Per length: our kernel's fwd+bwd time against fla's chunk kernel's; met at every length?"""
  ms = {(it['T'], it['impl'], it['mode']): it.get('ms') for it in items if 'impl' in it}
  rows, met = {}, True
  lengths = sorted({it['T'] for it in items if 'impl' in it})
  for T in lengths:
    ours = ms.get((T, 'pallas', 'fwd+bwd'))
    fla = next((v for (t, i, m), v in ms.items() if t == T and m == 'fwd+bwd'
                and i.startswith('fla_chunk')), None)
    rows[T] = None if ours is None or fla is None else ours / fla
    met = met and rows[T] is not None and rows[T] <= 1.0
  return {'pallas_over_fla_chunk_fwd_bwd': rows, 'met': bool(met and lengths)}


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
  k = [it for it in parts.get('kernels', {}).get('items', []) if 'errors' in it]
  if k:
    lines += ['', '## Kernels against the float64 reference (max |x − ref| / max |ref|)', '',
              '| case | compiled | pallas worst | xla worst | pallas vs xla worst | tol | ok |',
              '|---|---|---:|---:|---:|---:|---|']
    for it in k:
      e = it.get('errors', {})
      pick = lambda p: max((v for n, v in e.items() if n.startswith(p)), default=None)
      lines.append(f'| {it["name"]} | {it.get("compiled")} | {_f(pick("pallas_vs_f64"), "{:.1e}")} | '
                   f'{_f(pick("xla_vs_f64"), "{:.1e}")} | {_f(pick("pallas_vs_xla"), "{:.1e}")} | '
                   f'{it.get("tolerance"):.0e} | {it.get("ok")} |')
  m = [it for it in parts.get('model', {}).get('items', []) if 'form' in it]
  if m:
    lines += ['', '## Model logits, each form against the parallel form', '',
              '| dtype | form/impl | rel err | tol | ok |', '|---|---|---:|---:|---|']
    lines += [f'| {it["dtype"]} | {it["form"]} | {it["err"]:.1e} | {it["tolerance"]:.0e} | '
              f'{it["ok"]} |' for it in m]
  kt = parts.get('kernel_timing', {})
  timed = [it for it in kt.get('items', []) if 'impl' in it]
  if timed:
    s = kt.get('setting', {})
    lines += ['', f'## Kernel time (B = {s.get("B")}, H = {s.get("H")}, K = V = {s.get("K")}, '
              f'bf16, chunk {s.get("chunk")}; median of {s.get("repeats")} after {s.get("warmup")} '
              'warm-up calls)', '']
    impls = list(dict.fromkeys(it['impl'] for it in timed))
    lengths = sorted({it['T'] for it in timed})
    for mode in [m for m in ('fwd', 'fwd+bwd') if any(it['mode'] == m for it in timed)]:
      lines += [f'{mode}: ms (TFLOP/s, fraction of peak)', '',
                '| T | ' + ' | '.join(impls) + ' |', '|---:|' + '---:|' * len(impls)]
      for T in lengths:
        cells = []
        for impl in impls:
          it = next((x for x in timed if x['T'] == T and x['impl'] == impl and x['mode'] == mode), None)
          if it is None:
            cells.append('–')
          elif 'ms' not in it:
            cells.append('failed')
          else:
            frac = '' if it.get('peak_fraction') is None else f', {it["peak_fraction"]:.2f}'
            cells.append(f'{it["ms"]:.3f} ({it["tflops"]:.0f}{frac})')
        lines.append(f'| {T} | ' + ' | '.join(cells) + ' |')
      lines.append('')
    g = kt.get('goal', {})
    lines += [f'Goal, our kernel at or below fla\'s chunk kernel (fwd+bwd) at every length: '
              f'{g.get("met")}; ratio per length {g.get("pallas_over_fla_chunk_fwd_bwd")}.',
              f'fla\'s README (A100, chunk retention fwd+bwd): {FLA_A100_MS} ms.', PRACTICAL_NOTE,
              'FLOPs: retention B·H·T·(2C(K+V) + 4KV) forward, ×3 forward+backward; causal '
              'attention 2·B·H·T²·D forward, ×3.5 forward+backward.']
    agree = [it for it in kt.get('items', []) if it.get('kind') == 'agreement']
    if agree:
      lines += ['', 'Outputs agree (first 512 positions, rel err): ' + '; '.join(
          f'T={it["T"]} pallas vs {it["other"]} {it["err"]:.1e}' for it in agree)]
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
      st = results['parts']['kernel_timing'].get('setting', {})
      ax.set_title(f'{mode} (B={st.get("B")}, H={st.get("H")}, K=V={st.get("K")}, bf16)')
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=None, help='output folder ($OUT when set)')
  parser.add_argument('--dry_run', action='store_true', help='tiny shapes on CPU, interpreted')
  parser.add_argument('--budget_s', type=float, default=None,
                      help='global time budget in seconds (default 420; the dry run none)')
  parser.add_argument('--parts', default=','.join(PART_NAMES), help='comma-separated parts')
  parser.add_argument('--replot', default=None, help='only redraw table.md and plots of DIR')
  args = parser.parse_args(argv)
  if args.replot:
    with open(os.path.join(args.replot, 'results.json')) as f:
      results = json.load(f)
    write_table(results, os.path.join(args.replot, 'table.md'))
    print(write_plots(results, args.replot))
    return 0
  out = os.environ.get('OUT') or args.out
  if not out:
    print('error: --out is required (or set $OUT).', file=sys.stderr)
    return 1
  budget = args.budget_s if args.budget_s is not None else (1e9 if args.dry_run else 420.0)
  if not args.dry_run and jax.default_backend() != 'gpu':
    print(f'error: no GPU (backend {jax.default_backend()!r}); use --dry_run on a CPU.',
          file=sys.stderr)
    return 1
  parts = [p.strip() for p in args.parts.split(',') if p.strip()]
  try:
    results = Check(out, dry_run=args.dry_run, budget_s=budget, parts=parts,
                    log=lambda s: print(s, flush=True)).run()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  statuses = results['meta']['statuses']
  print(f'done in {results["meta"]["elapsed_s"]} s: {statuses}; see {os.path.join(out, "table.md")}')
  return 0 if all(s != 'failed' for s in statuses.values()) else 2


if __name__ == '__main__':
  sys.exit(main())
