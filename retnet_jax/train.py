"""Training and evaluation: a pure train step over an explicit state pytree, jitted with shardings.

    state = {'step': int32 [], 'params': pure dict of arrays, 'opt_state': optax state}

`train_and_evaluate(config, workdir)` builds the mesh, the data, the sharded state (restored from
the latest checkpoint in `<workdir>/checkpoints` when there is one), then loops: train step, logs
with throughput and ETA, evaluation, checkpoints; SIGTERM or Ctrl-C save a checkpoint and stop.
Metrics go to `<workdir>/metrics.jsonl` (one JSON object a line) and TensorBoard (`<workdir>/tb`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import data as data_lib
from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import sharding
from retnet_jax import tokenizer as tokenizer_lib

LN2 = math.log(2.0)
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'loss_mask')


# ------------------------------------------------------------------------------------------------
# Optimiser.


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine or linear decay to end_lr_fraction of it."""
  peak, warmup = optim.learning_rate, min(optim.warmup_steps, total_steps)
  end = peak * optim.get('end_lr_fraction', 0.1)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule must be 'cosine', 'linear' or 'constant'; got {optim.schedule!r}.")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: not on norm scales or the learnable decay rates."""
  def keep(path, _):
    name = getattr(path[-1], 'key', '')
    return name not in ('scale', 'decay_log_rate')
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping (the paper: β = (0.9, 0.98), weight decay 0.05, clip 2.0)."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=_decay_mask))
  return tx, schedule


# ------------------------------------------------------------------------------------------------
# The model as pure functions of its parameters.


def build_setup(config, tok=None) -> model_lib.Setup:
  """The model's Setup for a run: segments as config.reset_at_doc_boundaries, the tokenizer's bytes."""
  return model_lib.make_setup(config_lib.model_config(config),
                              use_segments=bool(config.get('reset_at_doc_boundaries', True)),
                              token_bytes=getattr(tok, 'token_bytes', None))


def batch_statistics(setup: model_lib.Setup, logits, batch) -> dict:
  """Sums over the scored targets: loss (nats), tokens, correct predictions, UTF-8 bytes."""
  mask = batch['loss_mask'].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  correct = (jnp.argmax(logits, axis=-1) == batch['targets']).astype(jnp.float32)
  nbytes = jnp.asarray(setup.token_bytes)[batch['targets']].astype(jnp.float32)
  return {'loss_sum': jnp.sum(loss * mask), 'tokens': jnp.sum(mask),
          'correct': jnp.sum(correct * mask), 'bytes': jnp.sum(nbytes * mask)}


def summarize(sums: dict) -> dict:
  """Per-token loss (nats), bits per byte, perplexity and accuracy from summed statistics."""
  tokens = max(float(sums['tokens']), 1.0)
  loss = float(sums['loss_sum']) / tokens
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
         'accuracy': float(sums['correct']) / tokens}
  if float(sums['bytes']) > 0:
    out['bits_per_byte'] = float(sums['loss_sum']) / LN2 / float(sums['bytes'])
  return out


def loss_fn(params, setup: model_lib.Setup, batch, rng):
  segments = batch['segment_ids'] if setup.use_segments else None
  logits, _ = model_lib.apply_model(setup, params, batch['inputs'], segment_ids=segments, rng=rng)
  stats = batch_statistics(setup, logits, batch)
  return stats['loss_sum'] / jnp.maximum(stats['tokens'], 1.0), stats


def train_step(state, batch, *, setup: model_lib.Setup, tx, schedule, accum_steps: int, base_key):
  """One optimiser update over the whole batch, accumulated over `accum_steps` micro-batches."""
  rng = jax.random.fold_in(base_key, state['step']) if setup.model_config.dropout > 0 else None
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, stats), grads = grad_fn(state['params'], setup, batch, rng)
  else:
    # [B, ...] -> [A, B/A, ...]: micro-batch i takes rows i, i+A, ... so each keeps the batch sharding.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)

    def body(carry, xs):
      mb, i = xs
      key = None if rng is None else jax.random.fold_in(rng, i)
      (_, stats), grads = grad_fn(state['params'], setup, mb, key)
      # Weight each micro-batch by its token count so the result is the whole batch's mean.
      grads = jax.tree.map(lambda g: g * stats['tokens'], grads)
      return jax.tree.map(jnp.add, carry, (grads, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, (state['params'], {k: jnp.zeros(()) for k in
                                                           ('loss_sum', 'tokens', 'correct', 'bytes')}))
    (grads, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(stats['tokens'], 1.0), grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  stats = {**stats, 'grad_norm': optax.tree.norm(grads),
           'learning_rate': schedule(state['step'])}
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, stats


def eval_step(params, batch, *, setup: model_lib.Setup):
  segments = batch['segment_ids'] if setup.use_segments else None
  logits, _ = model_lib.apply_model(setup, params, batch['inputs'], segment_ids=segments)
  return batch_statistics(setup, logits, batch)


# ------------------------------------------------------------------------------------------------
# Sharded state.


def state_shardings(abstract_state, params_axes, mesh, rules):
  """Shardings of the train state: parameters by their logical axes; optimiser moments like the
  parameter they belong to (matched by the trailing dict keys of their path); the rest replicated."""
  param_sh = sharding.tree_shardings(params_axes, abstract_state['params'], mesh, rules)
  by_path = {tuple(k.key for k in path): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  replicated = NamedSharding(mesh, P())

  def for_opt(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    s = by_path.get(tuple(keys))
    return s if s is not None and s.shard_shape(leaf.shape) is not None and len(
        s.spec) <= len(leaf.shape) else replicated

  opt_sh = jax.tree_util.tree_map_with_path(for_opt, abstract_state['opt_state'])
  return {'step': replicated, 'params': param_sh, 'opt_state': opt_sh}


def batch_sharding(mesh, rules):
  return NamedSharding(mesh, sharding.logical_to_spec(('batch', 'length'), rules))


def to_global(batch: dict, sh) -> dict:
  """Per-host numpy batch -> global jax arrays laid out by `sh`."""
  out = {}
  for k in BATCH_KEYS:
    local = np.asarray(batch[k])
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sh, local, global_shape)
  return out


# ------------------------------------------------------------------------------------------------
# Run set-up shared by train and eval.


# Before a backend starts: YNNPACK (XLA:CPU's library for dots, reductions and elementwise fusions
# in jax 0.10) for dots only. Its reductions were the slow part of long single sequences: the norm
# weights' gradients, [1, 16384, 256] -> [256], took 100 ms each against 2.5 ms at batch 32 × 512.
# A/B on 2 cores: chunkwise step at T = 16384 +15–25%, the Transformer +6%, T = 512 and the parallel
# form unchanged within noise.
_XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)


def tune_xla_cpu_flags() -> bool:
  """Adds `_XLA_CPU_FLAGS` to XLA_FLAGS unless set there already. Returns whether it did.

  Only a backend started afterwards sees them, so entrypoints call this first; a no-op once JAX
  has started (a notebook that already ran JAX keeps the defaults). GPU/TPU ignore the flags.
  """
  from jax._src import xla_bridge  # backends_are_initialized has no public spelling.
  if xla_bridge.backends_are_initialized():
    return False
  current = os.environ.get('XLA_FLAGS', '')
  todo = [f for f in _XLA_CPU_FLAGS if f.split('=')[0] not in current]
  if todo:
    os.environ['XLA_FLAGS'] = ' '.join([current, *todo]).strip()
  return bool(todo)


# XLA:CPU options that leave YNNPACK out of one executable, so that Eigen runs its dots.
EIGEN_DOTS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def step_compiler_options(model_cfg) -> dict | None:
  """XLA options for jitting the train and eval steps of `model_cfg` on this backend, or None.

  On CPU the chunkwise form compiles without YNNPACK, so its dots run in Eigen. Its batched
  products are small blocks ([B, H, N] × 64 × 64 × 128), which Eigen runs up to
  1.7× faster. A/B in one process on 2 cores: the chunkwise step is 6–13% faster at T = 512 …
  16384. The Transformer's and the parallel form's [T, T] products keep YNNPACK's dots: with
  Eigen the Transformer step was 12% slower at T = 2048.
  """
  if jax.default_backend() != 'cpu' or model_cfg.kind != 'retnet' or model_cfg.form != 'chunkwise':
    return None
  return dict(EIGEN_DOTS)


def tune_host_allocator() -> bool:
  """On CPU, keep freed buffers in the process for reuse (glibc mallopt). Returns whether it did.

  XLA:CPU allocates every step's activations afresh; glibc serves large blocks with mmap and gives
  them back on free, so each step pays a page fault per 4 KiB touched. On the tiny config that was
  ~15k faults per large matmul and made them 1.7× slower. Raising the mmap and trim thresholds keeps
  freed memory in the heap; the process's resident size stays near its peak instead of shrinking.
  """
  if jax.default_backend() != 'cpu':
    return False
  try:
    import ctypes
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # Not glibc (macOS, musl): nothing to tune.
    return False
  m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
  # One arena: XLA's worker threads would otherwise allocate from per-thread arenas, whose heaps
  # cannot hold blocks over 64 MiB and are trimmed on their own.
  return all(libc.mallopt(option, value) for option, value in (
      (m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, 2**31 - 1),
      (m_top_pad, 64 << 20)))


_distributed = {'initialized': False}


def init_distributed(mesh_config) -> None:
  """jax.distributed from config.mesh, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID in the environment; nothing for a single process."""
  address = mesh_config.get('coordinator_address') or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address or _distributed['initialized']:
    return
  num = mesh_config.get('num_processes') or int(os.environ.get('JAX_NUM_PROCESSES', '0')) or None
  pid = mesh_config.get('process_id')
  if pid is None and 'JAX_PROCESS_ID' in os.environ:
    pid = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(address, num_processes=num, process_id=pid)
  _distributed['initialized'] = True


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} cannot be written: {e.strerror or e}.') from e


def rules_of(config) -> dict:
  rules = config.mesh.rules
  rules = rules.to_dict() if hasattr(rules, 'to_dict') else dict(rules)
  unknown = sorted(set(rules) - set(sharding.LOGICAL_AXES))
  if unknown:
    raise ValueError(f'unknown logical axes in config.mesh.rules: {unknown}; '
                     f'known: {sharding.LOGICAL_AXES}.')
  for name, axes in rules.items():
    bad = [a for a in sharding._as_tuple(axes) if a not in sharding.AXES]
    if bad:
      raise ValueError(f'config.mesh.rules.{name} names unknown mesh axes {bad}; '
                       f'mesh axes are {sharding.AXES}.')
  return {a: rules.get(a) for a in sharding.LOGICAL_AXES}


class Run:
  """Everything one training or evaluation run builds from its config.

  devices: the devices the mesh lays out (default jax.devices()), e.g. TPU topology devices to
    compile for ahead of time. read_data: False builds no tokenizer (unless a byte one), datasets,
    workdir or checkpoint manager: only the shapes and shardings (`abstract_batch`, `abstract`).
  """

  def __init__(self, config, workdir: str | None, *, for_training: bool = True, devices=None,
               read_data: bool = True):
    config_lib.validate(config)
    tune_xla_cpu_flags()
    init_distributed(config.mesh)
    tune_host_allocator()
    self.config, self.workdir = config, workdir
    self.rules = rules_of(config)
    self.for_training, self.read_data = for_training, read_data
    self.mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.AXES}, devices)
    if read_data or data_lib.resolve_config(config.data)['tokenizer'] == 'byte':
      self.tokenizer = tokenizer_lib.get_tokenizer(config.data, workdir)
    else:
      self.tokenizer = None  # A SentencePiece model would be trained on the data.
    self.setup = build_setup(config, self.tokenizer)
    cfg = self.setup.model_config
    if self.tokenizer is not None:
      needed = data_lib.vocab_size(config.data, self.tokenizer)
      if needed > cfg.vocab_size:
        raise ValueError(f'the data needs {needed} token ids but model.vocab_size is '
                         f'{cfg.vocab_size}.')
    dp = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if config.batch_size % dp:
      raise ValueError(f'batch_size {config.batch_size} is not divisible by the data-parallel '
                       f'mesh size data×fsdp = {dp}.')
    self.train_iter, self.eval_batches = None, None
    if read_data:
      self.train_iter, self.eval_batches = data_lib.create_datasets(
          config.data, tokenizer=self.tokenizer, seq_len=config.seq_len,
          global_batch_size=config.batch_size, seed=config.seed)
      check_workdir(workdir)
    self.tx, self.schedule = make_optimizer(config.optim, config.total_steps)
    self.params_axes = model_lib.param_logical_axes(cfg)
    key = jax.random.key(config.seed)

    def init_state(key):
      params = model_lib.init_params(cfg, key)
      opt_state = self.tx.init(params) if for_training else None
      return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state}

    self.abstract_state = jax.eval_shape(init_state, key)
    self.state_sh = state_shardings(self.abstract_state, self.params_axes, self.mesh, self.rules)
    self.batch_sh = batch_sharding(self.mesh, self.rules)
    self._init = jax.jit(init_state, out_shardings=self.state_sh)
    self._key = key
    self.ckpt = None
    if read_data:
      self.ckpt = checkpoint.manager(os.path.join(workdir, 'checkpoints'),
                                     max_to_keep=config.checkpoint.max_to_keep)
    self.compiler_options = step_compiler_options(self.setup.model_config)
    self.eval_fn = jax.jit(functools.partial(eval_step, setup=self.setup),
                           in_shardings=(self.state_sh['params'], self.batch_sh),
                           compiler_options=self.compiler_options)

  def abstract(self, tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

  def abstract_train_state(self):
    """The train state as ShapeDtypeStructs with their shardings."""
    return self.abstract(self.abstract_state, self.state_sh)

  def abstract_batch(self) -> dict:
    """One global batch as ShapeDtypeStructs with the batch sharding (the keys of BATCH_KEYS)."""
    shape = (self.config.batch_size, self.config.seq_len)
    dtypes = {'inputs': jnp.int32, 'targets': jnp.int32, 'segment_ids': jnp.int32,
              'loss_mask': jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=self.batch_sh) for k in BATCH_KEYS}

  def initial_state(self):
    """The latest checkpoint's state, or a fresh one; a restore also moves the data iterator."""
    step = self.ckpt.latest_step()
    if step is None:
      with sharding.use_rules(self.mesh, self.rules):
        return self._init(self._key)
    restored = checkpoint.restore(
        self.ckpt, step,
        abstract_params=self.abstract(self.abstract_state['params'], self.state_sh['params']),
        abstract_opt_state=self.abstract(self.abstract_state['opt_state'], self.state_sh['opt_state']),
        data_iterator=self.train_iter)
    saved = checkpoint.model_config_from_dict(restored['meta']['model_config'])
    if saved != self.setup.model_config:
      raise ValueError(f'the checkpoint in {self.ckpt.directory} was trained with a different model '
                       f'config ({saved}) than this run ({self.setup.model_config}).')
    return {'step': jax.device_put(jnp.asarray(restored['meta']['step'], jnp.int32),
                                   self.state_sh['step']),
            'params': restored['params'], 'opt_state': restored['opt_state']}

  def evaluate(self, params) -> dict:
    totals = None
    with sharding.use_rules(self.mesh, self.rules):
      for batch in self.eval_batches():
        stats = self.eval_fn(params, to_global(batch, self.batch_sh))
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    if totals is None:
      raise ValueError('the evaluation split produced no batches.')
    return summarize(jax.device_get(totals))

  def save(self, state):
    checkpoint.save(self.ckpt, int(state['step']), params=state['params'],
                    opt_state=state['opt_state'], data_iterator=self.train_iter,
                    model_config=self.setup.model_config)


def make_train_step(run: Run, **overrides) -> Callable:
  """The jitted `train_step` of `run`: state and batch in their shardings, the state donated.

  overrides: keyword arguments of `train_step` to replace (e.g. accum_steps); jit it with
  `.lower(run.abstract_train_state(), run.abstract_batch())` to compile ahead of time.
  """
  kwargs = dict(setup=run.setup, tx=run.tx, schedule=run.schedule,
                accum_steps=run.config.optim.get('grad_accum_steps', 1),
                base_key=jax.random.key(run.config.seed + 1))
  kwargs.update(overrides)
  return jax.jit(functools.partial(train_step, **kwargs),
                 in_shardings=(run.state_sh, run.batch_sh), out_shardings=(run.state_sh, None),
                 donate_argnums=(0,), compiler_options=run.compiler_options)


# ------------------------------------------------------------------------------------------------
# Logging.


class _Stop:
  """Turns SIGTERM / SIGINT into a request to checkpoint and stop (a second SIGINT aborts)."""

  def __init__(self, enabled: bool = True):
    self.requested, self._previous, self.enabled = None, {}, enabled

  def __enter__(self):
    if self.enabled and threading_is_main():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint and stopping.', self.requested)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------
# Entry points.


def train_and_evaluate(config, workdir: str, *, max_steps: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the last metrics.

  max_steps: stop (with a checkpoint) after this many steps of this call, e.g. to train in pieces
  from a notebook; the learning-rate schedule still follows config.total_steps.
  """
  metrics_lib.quiet_library_logs()
  run = Run(config, workdir)
  setup, mesh = run.setup, run.mesh
  sharding.log_summary(mesh, run.params_axes, run.abstract_state['params'], run.rules)
  state = run.initial_state()
  start = int(state['step'])
  if start:
    logging.info('Resumed from the checkpoint at step %d.', start)
  total = config.total_steps
  stop_at = total if max_steps is None else min(total, start + max_steps)
  step_fn = make_train_step(run)
  writer = metrics_lib.MetricWriter(workdir)
  last = {}
  tokens_per_step = config.batch_size * config.seq_len
  sums, t_window, steps_in_window = None, time.perf_counter(), 0
  t_start = time.perf_counter()
  step = start
  with _Stop(config.checkpoint.get('save_on_sigterm', True)) as stop, \
       sharding.use_rules(mesh, run.rules):
    while step < stop_at and not stop.requested:
      batch = to_global(next(run.train_iter), run.batch_sh)
      state, stats = step_fn(state, batch)
      step += 1
      steps_in_window += 1
      sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
      if step % config.log_every == 0 or step == total:
        sums = jax.device_get(sums)
        elapsed = time.perf_counter() - t_window
        metrics = summarize(sums)
        metrics['learning_rate'] = float(stats['learning_rate'])
        metrics['grad_norm'] = float(sums['grad_norm']) / steps_in_window
        metrics['tokens_per_second'] = tokens_per_step * steps_in_window / elapsed
        metrics['steps_per_second'] = steps_in_window / elapsed
        eta = (total - step) / metrics['steps_per_second']
        logging.info('step %d/%d | loss %.4f%s | lr %.2e | %.0f tok/s | ETA %s', step, total,
                     metrics['loss'],
                     f" | {metrics['bits_per_byte']:.3f} bits/byte" if 'bits_per_byte' in metrics else '',
                     metrics['learning_rate'], metrics['tokens_per_second'], metrics_lib.duration(eta))
        writer.write(step, 'train', metrics)
        last['train'] = metrics
        sums, t_window, steps_in_window = None, time.perf_counter(), 0
      if step % config.eval_every == 0 or step == total:
        t_eval = time.perf_counter()
        metrics = run.evaluate(state['params'])
        logging.info('eval at step %d | loss %.4f | %s perplexity %.3f | accuracy %.4f (%.1fs)', step,
                     metrics['loss'],
                     f"{metrics['bits_per_byte']:.3f} bits/byte |" if 'bits_per_byte' in metrics else '',
                     metrics['perplexity'], metrics['accuracy'], time.perf_counter() - t_eval)
        writer.write(step, 'eval', metrics)
        last['eval'] = metrics
        t_window += time.perf_counter() - t_eval
      if step % config.checkpoint_every == 0 or step in (total, stop_at):
        run.save(state)
    if stop.requested and step < stop_at:
      run.save(state)
      logging.warning('Stopped by %s at step %d; rerun the same command to resume.',
                      stop.requested, step)
  writer.close()
  run.ckpt.close()
  logging.info('Done: %d steps in %s.', step - start, metrics_lib.duration(time.perf_counter() - t_start))
  return {'step': step, **last, 'stopped': bool(stop.requested and step < total)}


def evaluate(config, workdir: str) -> dict:
  """Restores the latest checkpoint of `workdir` and evaluates it on the held-out split."""
  metrics_lib.quiet_library_logs()
  run = Run(config, workdir, for_training=False)
  step = run.ckpt.latest_step()
  if step is None:
    raise ValueError(f'no checkpoint to evaluate in {os.path.join(workdir, "checkpoints")}.')
  restored = checkpoint.restore(
      run.ckpt, step,
      abstract_params=run.abstract(run.abstract_state['params'], run.state_sh['params']))
  metrics = run.evaluate(restored['params'])
  logging.info('eval of step %d: %s', step, json.dumps(metrics))
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, 'eval', metrics)
  writer.close()
  run.ckpt.close()
  return {'step': step, 'eval': metrics}
