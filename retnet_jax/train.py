"""Training and evaluation: a pure train step over an explicit state pytree, jitted with shardings.

    state = {'step': int32 [], 'params': pure dict of arrays, 'opt_state': optax state}

`train_and_evaluate(config, workdir)` builds the mesh, the data, the sharded state (restored from
the latest checkpoint in `<workdir>/checkpoints` when there is one, else fresh with the parameters
of config.init_from when it is set: docs/warm-start.md), then loops: train step, logs with
throughput, MFU, goodput and ETA, evaluation, checkpoints; SIGTERM or Ctrl-C save a checkpoint and
stop. Metrics go to `<workdir>/metrics.jsonl` (one JSON object a line) and TensorBoard
(`<workdir>/tb`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import optax

from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import data as data_lib
from retnet_jax import flops
from retnet_jax import loss as loss_lib
from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import optim
from retnet_jax import platform
from retnet_jax import preemption
from retnet_jax import sharding

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'loss_mask')


# ------------------------------------------------------------------------------------------------
# The model as pure functions of its parameters.


def loss_fn(params, setup: model_lib.Setup, batch, rng, loss_chunk: int = 0):
  stats = loss_lib.statistics(setup, params, batch, chunk_size=loss_chunk, rng=rng)
  return stats['loss_sum'] / jnp.maximum(stats['tokens'], 1.0), stats


def train_step(state, batch, *, setup: model_lib.Setup, tx, schedule, accum_steps: int, base_key,
               trainable=None, loss_chunk: int = 0):
  """One optimiser update over the whole batch, accumulated over `accum_steps` micro-batches.

  trainable: optim.trainable_mask's tree; frozen gradients (whole parameters, or the frozen
  repeats of a stacked one) are dropped at once, so the compiler never computes them.
  loss_chunk: positions per chunk of the loss (loss.statistics; 0: the whole logits at once)."""
  rng = jax.random.fold_in(base_key, state['step']) if setup.model_config.dropout > 0 else None
  value_and_grad = jax.value_and_grad(functools.partial(loss_fn, loss_chunk=loss_chunk), has_aux=True)

  def grad_fn(*args):
    (loss, stats), grads = value_and_grad(*args)
    if trainable is not None:
      grads = optim.apply_mask(grads, trainable)
    return (loss, stats), grads

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
  grad_norm = optax.tree.norm(grads)
  # A non-finite loss or gradient norm leaves parameters and moments as they were, so no state the
  # loop holds (or saves) is ever non-finite; the loop stops or skips on `nonfinite`.
  finite = jnp.isfinite(stats['loss_sum']) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params = keep(params, state['params'])
  opt_state = keep(opt_state, state['opt_state'])
  step1 = (state['step'] + 1).astype(jnp.float32)
  stats = {**stats, 'grad_norm': grad_norm, 'learning_rate': schedule(state['step']),
           'nonfinite': 1.0 - finite.astype(jnp.float32),
           'first_nonfinite': jnp.where(finite, jnp.inf, step1)}
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, stats


def accumulate(sums, stats):
  """Window sums of step statistics (the first non-finite step is a minimum, not a sum)."""
  if sums is None:
    return stats
  out = jax.tree.map(jnp.add, sums, stats)
  out['first_nonfinite'] = jnp.minimum(sums['first_nonfinite'], stats['first_nonfinite'])
  return out


def eval_step(params, batch, *, setup: model_lib.Setup, loss_chunk: int = 0):
  return loss_lib.statistics(setup, params, batch, chunk_size=loss_chunk)


# ------------------------------------------------------------------------------------------------
# Run set-up shared by train and eval.


class Run:
  """Everything one training or evaluation run builds from its config.

  devices: the devices the mesh lays out (default jax.devices()), e.g. TPU topology devices to
    compile for ahead of time. read_data: False builds no tokenizer (unless a byte one), datasets,
    workdir or checkpoint manager: only the shapes and shardings (`abstract_batch`, `abstract`).
  """

  def __init__(self, config, workdir: str | None, *, for_training: bool = True, devices=None,
               read_data: bool = True):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.rules = config_lib.mesh_rules(config)
    self.for_training, self.read_data = for_training, read_data
    self.mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.AXES}, devices)
    # What the run's own checkpoints carry on (tokenizer, warm start), else what init_from gives.
    self.carried_meta = self._carried_meta() if read_data else {}
    carried = data_lib.carried_tokenizer(config.data, self.carried_meta)
    if carried is not None:
      self.tokenizer = carried
    elif read_data or data_lib.resolve_config(config.data)['tokenizer'] == 'byte':
      self.tokenizer = data_lib.get_tokenizer(config.data, workdir)
    else:
      self.tokenizer = None  # A SentencePiece model would be trained on the data.
    self.setup = model_lib.make_setup(  # Segments as the config says, bytes as the tokenizer does.
        config_lib.model_config(config),
        use_segments=bool(config.get('reset_at_doc_boundaries', True)),
        token_bytes=getattr(self.tokenizer, 'token_bytes', None))
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
      checkpoint.check_workdir(workdir)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.total_steps)
    self.params_axes = model_lib.param_logical_axes(cfg)
    key = jax.random.key(config.seed)

    def init_state(key):
      params = model_lib.init_params(cfg, key)
      opt_state = self.tx.init(params) if for_training else None
      return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt_state}

    self.abstract_state = jax.eval_shape(init_state, key)
    self.state_sh = sharding.state_shardings(self.abstract_state, self.params_axes, self.mesh, self.rules)
    self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self._init = jax.jit(init_state, out_shardings=self.state_sh)
    self._key = key
    self.ckpt = None
    if read_data:
      self.ckpt = checkpoint.manager(os.path.join(workdir, 'checkpoints'),
                                     max_to_keep=config.checkpoint.max_to_keep)
    self.compiler_options = platform.step_compiler_options(
        cfg, self.mesh.devices.flat[0].platform)
    self.loss_chunk = config.get('loss_chunk_size', 0) or 0
    if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
      raise ValueError(f'config.loss_chunk_size must be an integer >= 0 (0: the whole logits at '
                       f'once); got {self.loss_chunk!r}.')
    self.eval_fn = jax.jit(functools.partial(eval_step, setup=self.setup, loss_chunk=self.loss_chunk),
                           in_shardings=(self.state_sh['params'], self.batch_sh),
                           compiler_options=self.compiler_options)

  def _carried_meta(self) -> dict:
    """The tokenizer and warm-start record of the run's latest checkpoint; without one, those of
    config.init_from (its tokenizer, and {'init_from': {'path', 'step'}} until the warm start
    records what it loaded)."""
    own = os.path.join(self.workdir, 'checkpoints')
    if os.path.isdir(own):  # Read before anything is created: a bad data config leaves no workdir.
      mgr = checkpoint.manager(own, max_to_keep=None, read_only=True)
      latest = mgr.latest_step()
      if latest is not None:
        # Every step of a run carries the same tokenizer and warm-start record: read the newest
        # intact one (its checksums checked), and leave naming a damaged step to the restore.
        intact = checkpoint.choose_step(mgr, None, fallback=True)
        meta = {} if intact is None else checkpoint.read_meta(mgr, intact)
        mgr.close()
        return {k: meta[k] for k in ('tokenizer', 'init_from') if k in meta}
      mgr.close()
    source = self.config.get('init_from') or ''
    if not source:
      return {}
    try:
      mgr = checkpoint.open_read_only(source)
      step = checkpoint.choose_step(mgr, self.config.get('init_from_step'))
      if step is None:
        raise ValueError(f'no checkpoint in {mgr.directory}.')
      meta = checkpoint.read_meta(mgr, step)
    except ValueError as e:
      raise ValueError(f'config.init_from: {e}') from e
    mgr.close()
    out = {'init_from': {'path': os.path.abspath(source), 'step': step}}
    if meta.get('tokenizer'):
      out['tokenizer'] = meta['tokenizer']
    return out

  def warm_start_params(self, params):
    """`params` (freshly initialised, in the run's shardings) with the leaves of config.init_from
    put in their place, restored straight into the same shardings and dtypes. Raises ValueError
    naming the first mismatches unless config.init_from_strict is False; records in
    `carried_meta['init_from']` what was loaded and what stayed fresh."""
    record = self.carried_meta['init_from']
    strict = bool(self.config.get('init_from_strict', True))
    mgr = checkpoint.open_read_only(record['path'])
    saved_cfg = checkpoint.model_config_from_dict(
        checkpoint.read_meta(mgr, record['step'])['model_config'])
    saved = model_lib.abstract_params(saved_cfg)
    target = self.abstract(self.abstract_state['params'], self.state_sh['params'])
    loadable, problems = checkpoint.match_params(saved, target)
    where = f"config.init_from {record['path']} (step {record['step']})"
    if problems and strict:
      more = f' and {len(problems) - 3} more' if len(problems) > 3 else ''
      raise ValueError(f"{where} does not match the model: {'; '.join(problems[:3])}{more}. "
                       'Set config.init_from_strict=False to load the matching part.')
    if not loadable:
      raise ValueError(f'{where} has no parameter of the model\'s names and shapes.')
    differences = [d for d in checkpoint.model_differences(saved_cfg, self.setup.model_config)
                   if not d.startswith('param_dtype ')]  # Cast on restore.
    if differences:
      logging.warning('%s was saved by a model with other settings: %s.', where,
                      '; '.join(differences))
    loaded = checkpoint.restore_matching(mgr, record['step'], saved, target, loadable)
    mgr.close()
    fresh = sorted(set(checkpoint.flat_paths(params)) - set(loaded))
    record.update(strict=strict, loaded=sorted(loaded), fresh=fresh)
    logging.info('Initialised from %s: %d parameters loaded%s.', where, len(loaded),
                 f', fresh: {fresh}' if fresh else '')
    return jax.tree_util.tree_map_with_path(
        lambda keys, x: loaded.get(checkpoint.path_name(keys), x), params)

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

  def checkpoint_step(self, step: int | None = None) -> int | None:
    """The step to restore (`step`, else the latest; the newest intact one when the latest is
    damaged and config.checkpoint.fallback_to_intact), checked against this run's model before
    anything is restored. None without checkpoints."""
    if self.ckpt is None:
      return None
    step = checkpoint.choose_step(
        self.ckpt, step, fallback=bool(self.config.checkpoint.get('fallback_to_intact', False)))
    if step is None:
      return None
    saved = checkpoint.model_config_from_dict(checkpoint.read_meta(self.ckpt, step)['model_config'])
    differences = checkpoint.model_differences(saved, self.setup.model_config)
    if differences:
      raise ValueError(f'the checkpoint in {self.ckpt.directory} (step {step}) is of a different '
                       f"model: {'; '.join(differences)}. Use another workdir or the same model.")
    return step

  def initial_state(self, step: int | None = None):
    """The state of checkpoint `step` (default the latest), or a fresh one (with config.init_from's
    parameters when set); a restore also moves the data iterator."""
    step = self.checkpoint_step(step)
    if step is None:
      with sharding.use_rules(self.mesh, self.rules):
        state = self._init(self._key)
      if 'init_from' in self.carried_meta:
        state['params'] = self.warm_start_params(state['params'])
      return state
    restored = checkpoint.restore(
        self.ckpt, step,
        abstract_params=self.abstract(self.abstract_state['params'], self.state_sh['params']),
        abstract_opt_state=self.abstract(self.abstract_state['opt_state'], self.state_sh['opt_state']),
        data_iterator=self.train_iter, check=False)
    return {'step': jax.device_put(jnp.asarray(restored['meta']['step'], jnp.int32),
                                   self.state_sh['step']),
            'params': restored['params'], 'opt_state': restored['opt_state']}

  def evaluate(self, params) -> dict:
    totals = None
    with sharding.use_rules(self.mesh, self.rules):
      for batch in self.eval_batches():
        stats = self.eval_fn(params, sharding.to_global(batch, self.batch_sh, BATCH_KEYS))
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    if totals is None:
      raise ValueError('the evaluation split produced no batches.')
    return metrics_lib.summarize(jax.device_get(totals))

  def save(self, state):
    step = int(state['step'])
    if step in self.ckpt.all_steps():  # Resumed from an earlier --step: this run replaces it.
      self.ckpt.delete(step)
    checkpoint.save(self.ckpt, step, params=state['params'],
                    opt_state=state['opt_state'], data_iterator=self.train_iter,
                    model_config=self.setup.model_config, extra_meta=self.carried_meta)


def make_train_step(run: Run, **overrides) -> Callable:
  """The jitted `train_step` of `run`: state and batch in their shardings, the state donated.

  overrides: keyword arguments of `train_step` to replace (e.g. accum_steps); jit it with
  `.lower(run.abstract_train_state(), run.abstract_batch())` to compile ahead of time.
  """
  kwargs = dict(setup=run.setup, tx=run.tx, schedule=run.schedule,
                accum_steps=run.config.optim.get('grad_accum_steps', 1),
                base_key=jax.random.key(run.config.seed + 1), loss_chunk=run.loss_chunk)
  if run.config.optim.get('trainable'):
    kwargs['trainable'] = optim.trainable_mask(run.config.optim.trainable,
                                               run.abstract_state['params'])
  kwargs.update(overrides)
  return jax.jit(functools.partial(train_step, **kwargs),
                 in_shardings=(run.state_sh, run.batch_sh), out_shardings=(run.state_sh, None),
                 donate_argnums=(0,), compiler_options=run.compiler_options)


# ------------------------------------------------------------------------------------------------
# Entry points.


class NonFinite(ValueError):
  """The loss or gradient norm turned NaN or Inf (config.checkpoint.on_nonfinite='stop')."""


def train_and_evaluate(config, workdir: str, *, max_steps: int | None = None,
                       step: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint (or checkpoint `step`).
  Returns the last metrics, 'step', and 'stopped' (the signal's name when one stopped it, else '').

  max_steps: stop (with a checkpoint) after this many steps of this call, e.g. to train in pieces
  from a notebook; the learning-rate schedule still follows config.total_steps. Non-finite updates
  are never applied; config.checkpoint.on_nonfinite 'stop' raises NonFinite naming the step where
  they began, 'skip' goes on without them.
  """
  metrics_lib.quiet_library_logs()
  run = Run(config, workdir)
  sharding.log_summary(run.mesh, run.params_axes, run.abstract_state['params'], run.rules)
  state = run.initial_state(step)
  start = int(state['step'])
  saved = start if start else None  # The step already on disk.
  if start:
    logging.info('Resumed from the checkpoint at step %d.', start)
  total = config.total_steps
  stop_at = total if max_steps is None else min(total, start + max_steps)
  skip_nonfinite = config.checkpoint.get('on_nonfinite', 'stop') == 'skip'
  step_fn = make_train_step(run)
  flops_per_token = flops.train_flops_per_token(run.setup.model_config, config.seq_len)
  peak, peak_source = flops.peak_flops(run.mesh.devices.flat)
  logging.info('MFU: %.3e model FLOPs per token (retnet_jax/flops.py) against a peak of %.3e '
               'FLOP/s (%s).', flops_per_token, peak, peak_source)
  writer = metrics_lib.MetricWriter(workdir)
  last, skipped = {}, 0
  tokens_per_step = config.batch_size * config.seq_len
  sums, t_window, steps_in_window = None, time.perf_counter(), 0
  t_start = time.perf_counter()
  clock = metrics_lib.Goodput()
  step = start

  def check_finite():
    nonlocal skipped
    bad, first = (float(x) for x in jax.device_get((sums['nonfinite'], sums['first_nonfinite'])))
    if bad and not skip_nonfinite:
      raise NonFinite(f'the loss or gradient norm became NaN/Inf at step {int(first)} '
                      f'({int(bad)} of the last {steps_in_window} steps); stopped without saving '
                      f"it (last checkpoint: {'none' if saved is None else f'step {saved}'}). "
                      'Lower optim.learning_rate, or set '
                      "config.checkpoint.on_nonfinite='skip'.")
    if bad:
      skipped += int(bad)
      logging.warning('Skipped %d non-finite updates, the first at step %d (%d in this run).',
                      int(bad), int(first), skipped)
      sums['nonfinite'], sums['first_nonfinite'] = jnp.zeros(()), jnp.full((), jnp.inf)

  with preemption.StopOnSignal(config.checkpoint.get('save_on_sigterm', True)) as stop, \
       sharding.use_rules(run.mesh, run.rules):
    while step < stop_at and not stop.requested:
      with clock.timing('data'):
        batch = sharding.to_global(next(run.train_iter), run.batch_sh, BATCH_KEYS)
      with clock.timing('compile') if step == start else contextlib.nullcontext():
        state, stats = step_fn(state, batch)
      step += 1
      steps_in_window += 1
      sums = accumulate(sums, stats)
      if step % config.log_every == 0 or step == total:
        check_finite()
        sums = jax.device_get(sums)
        elapsed = time.perf_counter() - t_window
        metrics = metrics_lib.summarize(sums)
        metrics['learning_rate'] = float(stats['learning_rate'])
        metrics['grad_norm'] = float(sums['grad_norm']) / steps_in_window
        metrics['tokens_per_second'] = tokens_per_step * steps_in_window / elapsed
        metrics['steps_per_second'] = steps_in_window / elapsed
        metrics['model_flops_per_second'] = flops_per_token * metrics['tokens_per_second']
        metrics['mfu'] = metrics['model_flops_per_second'] / peak
        metrics.update(clock.fractions())
        if skip_nonfinite:
          metrics['skipped_updates'] = skipped
        eta = (total - step) / metrics['steps_per_second']
        logging.info('%s', metrics_lib.train_line(step, total, metrics, eta))
        writer.write(step, 'train', metrics)
        last['train'] = metrics
        sums, t_window, steps_in_window = None, time.perf_counter(), 0
      if step % config.eval_every == 0 or step == total:
        t_eval = time.perf_counter()
        with clock.timing('eval'):
          metrics = run.evaluate(state['params'])
        logging.info('%s', metrics_lib.eval_line(step, metrics, time.perf_counter() - t_eval))
        writer.write(step, 'eval', metrics)
        last['eval'] = metrics
        t_window += time.perf_counter() - t_eval
      if step % config.checkpoint_every == 0 or step in (total, stop_at):
        if sums is not None:
          check_finite()
        with clock.timing('checkpoint'):
          run.save(state)
        saved = step
    if stop.requested and step < stop_at:
      if step != saved:  # A signal during the step just saved (its eval or save) saves nothing.
        if sums is not None:
          check_finite()
        run.save(state)
      logging.warning('Stopped by %s at step %d; rerun the same command to resume.',
                      stop.requested, step)
  writer.close()
  run.ckpt.close()
  logging.info('Done: %d steps in %s.', step - start, metrics_lib.duration(time.perf_counter() - t_start))
  return {'step': step, **last, 'stopped': stop.requested if stop.requested and step < total else ''}


def evaluate(config, workdir: str, *, step: int | None = None) -> dict:
  """Restores checkpoint `step` (default the latest) of `workdir` and evaluates it on the held-out
  split."""
  metrics_lib.quiet_library_logs()
  run = Run(config, workdir, for_training=False)
  step = run.checkpoint_step(step)
  if step is None:
    raise ValueError(f'no checkpoint to evaluate in {os.path.join(workdir, "checkpoints")}.')
  restored = checkpoint.restore(
      run.ckpt, step, check=False,
      abstract_params=run.abstract(run.abstract_state['params'], run.state_sh['params']))
  metrics = run.evaluate(restored['params'])
  logging.info('eval of step %d: %s', step, json.dumps(metrics))
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, 'eval', metrics)
  writer.close()
  run.ckpt.close()
  return {'step': step, 'eval': metrics}
