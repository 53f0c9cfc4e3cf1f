"""Sharded training on 8 virtual CPU devices (tests/conftest.py): same losses on every mesh, parameter
shardings as the rules say, checkpoints that move between meshes, and the command line."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from retnet_jax import config_lib
from retnet_jax import sharding
from retnet_jax import train
from tests import util

MESHES = [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 2, 4)]


def cfg(mesh=(1, 1, 1), **overrides):
  # 4 heads so that tensor = 2 and 4 split them; batch 8 so data × fsdp = 8 splits it.
  base = dict(model__num_heads=4, model__value_dim=64, batch_size=8, total_steps=4, log_every=1,
              eval_every=4, checkpoint_every=100, mesh__data=mesh[0], mesh__fsdp=mesh[1],
              mesh__tensor=mesh[2])
  return util.config(**{**base, **overrides})


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return util.trained_losses(cfg(), tmp_path_factory.mktemp('one_device'))


def test_eight_devices_are_visible():
  assert jax.device_count() == 8


@pytest.mark.parametrize('mesh', MESHES)
def test_losses_match_one_device(mesh, one_device, tmp_path):
  train.train_and_evaluate(cfg(mesh), str(tmp_path))
  sharded = util.train_losses(str(tmp_path))
  assert len(sharded) == len(one_device) == 4
  np.testing.assert_allclose(sharded, one_device, rtol=1e-5)


def test_transformer_losses_match_one_device(tmp_path):
  """The Transformer baseline trains through the same sharded path."""
  overrides = dict(model__kind='transformer', model__value_dim=None)
  train.train_and_evaluate(cfg(**overrides), str(tmp_path / 'one'))
  train.train_and_evaluate(cfg((2, 2, 2), **overrides), str(tmp_path / 'mesh'))
  np.testing.assert_allclose(util.train_losses(str(tmp_path / 'mesh')), util.train_losses(str(tmp_path / 'one')),
                             rtol=1e-5)


def test_pallas_kernel_runs_per_shard(monkeypatch, tmp_path):
  """The Pallas kernel (interpreted on CPU) under a (2, 2, 2) mesh runs on each batch × heads shard
  and trains like the XLA path on one device."""
  from retnet_jax import retention_pallas
  shard_shapes = []
  kernel = retention_pallas.chunkwise

  def counting(q_BTHK, *args, **kwargs):
    shard_shapes.append(q_BTHK.shape)
    return kernel(q_BTHK, *args, **kwargs)

  monkeypatch.setattr(retention_pallas, 'chunkwise', counting)
  common = dict(reset_at_doc_boundaries=True, total_steps=3, eval_every=3)  # Resets per shard too.
  train.train_and_evaluate(cfg(model__retention_impl='xla', **common), str(tmp_path / 'one'))
  assert not shard_shapes
  train.train_and_evaluate(cfg((2, 2, 2), model__retention_impl='pallas', **common),
                           str(tmp_path / 'mesh'))
  # Batch 8 over data × fsdp = 4, 4 heads over tensor = 2 (the global shape is only traced, by
  # `per_shard`'s eval_shape of the outputs).
  assert set(shard_shapes) == {(2, 37, 2, 12), (8, 37, 4, 12)}, shard_shapes
  np.testing.assert_allclose(util.train_losses(str(tmp_path / 'mesh')), util.train_losses(str(tmp_path / 'one')),
                             rtol=1e-5)


def test_parameter_shardings_follow_the_rules():
  run = train.Run(cfg((1, 2, 4)), '/tmp/unused_workdir_sharding_test', for_training=True)
  state = run.initial_state()
  ret = state['params']['blocks']['retention']
  ffn = state['params']['blocks']['ffn']
  expect = {
      # ('layers', 'embed', 'heads', 'kv'): layers unsharded, embed over fsdp, heads over tensor.
      'wq': P(None, 'fsdp', 'tensor', None),
      'wo': P(None, 'tensor', None, 'fsdp'),  # ('layers', 'heads', 'kv', 'embed')
  }
  for name, spec in expect.items():
    assert ret[name].sharding.spec == spec, name
    assert ret[name].sharding.mesh.shape == {'data': 1, 'fsdp': 2, 'sequence': 1, 'tensor': 4}
  assert ffn['w_gate'].sharding.spec == P(None, 'fsdp', 'tensor')  # ('layers', 'embed', 'mlp')
  assert state['params']['embed'].sharding.spec == P('tensor', 'fsdp')  # ('vocab', 'embed')
  # Every parameter, stacked layer axis included, resolves through the rules; Adam's moments
  # are laid out like their parameters.
  axes = run.params_axes
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_params = jax.tree.leaves(state['params'])
  for ax, p in zip(flat_axes, flat_params):
    assert p.sharding.spec == sharding.logical_to_spec(ax, run.rules, run.mesh, p.shape)
    if p.ndim > 1 and ax[0] == 'layers':
      assert p.sharding.spec[0] is None
  mu = state['opt_state'][1][0].mu
  assert mu['blocks']['retention']['wq'].sharding.spec == expect['wq']
  run.ckpt.close()


def test_indivisible_dimensions_are_replicated():
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 8})
  rules = {'heads': 'tensor', 'embed': 'fsdp'}
  assert sharding.logical_to_spec(('embed', 'heads'), rules, mesh, (48, 3)) == P('fsdp', None)
  assert sharding.logical_to_spec(('embed', 'heads'), rules, mesh, (48, 16)) == P('fsdp', 'tensor')


def test_bad_mesh_configs():
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.make_mesh({'data': 4, 'fsdp': 4})
  with pytest.raises(ValueError, match='at most one'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})
  with pytest.raises(ValueError, match='unknown mesh axes'):
    config_lib.mesh_rules(cfg(mesh__rules__heads='model'))
  with pytest.raises(ValueError, match='not divisible by the data-parallel'):
    train.Run(cfg((8, 1, 1), batch_size=4), '/tmp/unused')


def test_checkpoint_moves_between_meshes(one_device, tmp_path):
  """Three steps on mesh (2, 2, 2), then the last step on (1, 8, 1): the same losses as one device."""
  workdir = str(tmp_path)
  train.train_and_evaluate(cfg((2, 2, 2)), workdir, max_steps=3)
  train.train_and_evaluate(cfg((1, 8, 1)), workdir)
  np.testing.assert_allclose(util.train_losses(workdir), one_device, rtol=1e-5)
  out = train.evaluate(cfg((8, 1, 1)), workdir)
  assert out['step'] == 4 and np.isfinite(out['eval']['loss'])


def _two_processes(workdir, total_steps):
  """Trains with two processes (4 CPU devices each, jax.distributed over localhost) on one
  8-device mesh; returns the first process's output."""
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  overrides = {'model.num_heads': 4, 'model.value_dim': 64, 'batch_size': 8,
               'total_steps': total_steps, 'log_every': 1, 'eval_every': 4, 'checkpoint_every': 2,
               'optim.schedule': 'constant', 'optim.warmup_steps': 0,
               'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  cmd = [sys.executable, '-m', 'retnet_jax.main',
         f'--config={os.path.join(util.ROOT, "configs", "retnet_tiny.py")}:test',
         f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()]]
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(cmd, cwd=util.ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs[0]


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_exactly(tmp_path):
  """The command line on a (2, 2, 2) mesh over two processes: each reads its own data shard and
  saves its own iterator position, so a run resumed at step 2 gives the losses of one that never
  stopped."""
  workdir = str(tmp_path)
  out = _two_processes(workdir, 4)
  assert "Mesh {'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2} over 8 devices (2 processes)" in out
  assert 'blocks/retention/wq' in out and "P(None, 'fsdp', 'tensor', None)" in out
  straight = util.train_losses(workdir)
  assert len(straight) == 4 and np.all(np.isfinite(straight))
  data = os.path.join(workdir, 'checkpoints', '2', 'data')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(data))
  # Back to step 2, as if stopped there (one launch fewer than stopping a run at 2).
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    kept = [line for line in f if json.loads(line)['step'] <= 2]
  with open(path, 'w') as f:
    f.writelines(kept)
  _two_processes(workdir, 4)
  assert util.train_losses(workdir) == straight
