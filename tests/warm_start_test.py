"""Warm start (config.init_from) and fine-tuning a subset of the parameters (optim.trainable)."""

import dataclasses
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from retnet_jax import checkpoint
from retnet_jax import data as data_lib
from retnet_jax import model as model_lib
from retnet_jax import tokenizer as tokenizer_lib
from retnet_jax import train
from tests import util
from tests.convert_fla_test import build_fla  # noqa: F401 (fla: a fixture)
from tests.convert_fla_test import fla  # noqa: F401 (fla: a fixture)
from tests.convert_fla_test import fla_config  # noqa: F401 (fla: a fixture)
from tests.convert_fla_test import hf_tokenizer_meta  # noqa: F401 (fla: a fixture)
from tests.convert_fla_test import import_cli  # noqa: F401 (fla: a fixture)
from tests.convert_util import numpy_params

# How a model runs is the run's choice, not the checkpoint's.
EXECUTION = ('form', 'chunk_size', 'remat', 'retention_impl', 'scan_layers', 'dropout', 'dtype')


def config_for(cfg: model_lib.ModelConfig, **overrides):
  """The shrunk config with its model section set to `cfg`'s parameter-shaping fields."""
  fields = {f'model__{f.name}': getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in EXECUTION}
  return util.config(**{**fields, **overrides})


def step_meta(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)


def cross_entropy(logits_BTV, batch):
  """Mean cross-entropy over the scored targets, float64 NumPy."""
  x = np.asarray(logits_BTV, np.float64)
  top = x.max(-1, keepdims=True)
  logz = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
  target = np.take_along_axis(x, np.asarray(batch['targets'])[..., None], -1)[..., 0]
  mask = np.asarray(batch['loss_mask'], np.float64)
  return float(((logz - target) * mask).sum() / mask.sum())


def test_fla_checkpoint_trains_from_its_own_loss_and_resumes_without_it(request, tmp_path):
  """fla's RetNet -> the converter -> init_from: the first logged loss is the converted model's loss
  on that batch; the run improves; its resume restores its own checkpoint, never init_from."""
  _, cfg = import_cli(build_fla(request.getfixturevalue('fla'), fla_config()), tmp_path)
  converted = str(tmp_path / 'ours')
  workdir = str(tmp_path / 'run')
  config = config_for(cfg, init_from=converted, total_steps=8, log_every=1, eval_every=100,
                      checkpoint_every=100, optim__warmup_steps=1, optim__learning_rate=3e-3)
  train.train_and_evaluate(config, workdir, max_steps=5)

  params, saved_cfg, _ = checkpoint.load_params(converted)
  setup = model_lib.make_setup(saved_cfg)
  train_iter, _ = data_lib.create_datasets(config.data, tokenizer=tokenizer_lib.ByteTokenizer(),
                                           seq_len=config.seq_len,
                                           global_batch_size=config.batch_size, seed=config.seed)
  batch = next(train_iter)
  logits, _ = model_lib.apply_model(setup, params, batch['inputs'], segment_ids=batch['segment_ids'])
  losses = util.train_losses(workdir)
  ref = cross_entropy(logits, batch)
  assert abs(losses[0] - ref) <= 1e-5 * max(1.0, abs(ref)), (losses[0], ref)

  record = step_meta(workdir, 5)['init_from']
  assert record['path'] == os.path.abspath(converted) and record['step'] == 0
  assert record['fresh'] == [] and 'head' in record['loaded']
  shutil.rmtree(converted)  # A resume that read it again would fail.
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 8
  losses = util.train_losses(workdir)
  assert len(losses) == 8 and np.mean(losses[-2:]) < losses[0] - 0.1, losses
  assert step_meta(workdir, 8)['init_from'] == record


def test_mismatched_init_from_stops_before_any_step_with_one_line(tmp_path):
  source = util.model_config()
  checkpoint.save_params(str(tmp_path / 'src'), numpy_params(source), source)
  config = util.config(init_from=str(tmp_path / 'src'), model__ffn_dim=64)
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert '\n' not in message
  assert 'blocks/ffn/w_down [2, 80, 48] -> [2, 64, 48]' in message, message
  assert 'init_from_strict=False' in message
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == []


def test_partial_match_casts_into_the_run_shardings_and_records_what_was_fresh(tmp_path):
  """A fixed-γ checkpoint into a learnable-γ run in bfloat16 on a (2, 2, 2) mesh: strict refuses;
  non-strict loads all but the decay rates, cast, each in the run's sharding."""
  mesh = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2, model__num_heads=4)
  source = util.model_config(**mesh)
  saved = numpy_params(source, seed=3)
  checkpoint.save_params(str(tmp_path / 'src'), saved, source)
  common = dict(init_from=str(tmp_path / 'src'), model__gamma='learnable',
                model__param_dtype='bfloat16', **mesh)
  with pytest.raises(ValueError, match='blocks/retention/decay_log_rate missing'):
    train.Run(util.config(**common), str(tmp_path / 'strict')).initial_state()

  run = train.Run(util.config(init_from_strict=False, **common), str(tmp_path / 'run'))
  state = run.initial_state()
  record = run.carried_meta['init_from']
  assert record['fresh'] == ['blocks/retention/decay_log_rate'] and not record['strict']
  got = checkpoint.flat_paths(state['params'])
  shardings = checkpoint.flat_paths(run.state_sh['params'])
  for path, value in checkpoint.flat_paths(saved).items():
    assert got[path].dtype == ml_dtypes.bfloat16
    assert got[path].sharding == shardings[path], path
    np.testing.assert_array_equal(np.asarray(got[path]), value.astype(ml_dtypes.bfloat16))
  assert int(state['step']) == 0
  assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(state['opt_state'])
             if hasattr(x, 'shape') and x.ndim > 0)


def test_converted_tokenizer_is_used_and_must_fit_the_vocabulary(tmp_path):
  source = util.model_config()
  for name, vocab in (('fits', 300), ('too_big', 500)):
    checkpoint.save_params(str(tmp_path / name), numpy_params(source), source,
                           extra_meta=hf_tokenizer_meta(vocab))
  run = train.Run(util.config(init_from=str(tmp_path / 'fits')), str(tmp_path / 'a'))
  assert isinstance(run.tokenizer, tokenizer_lib.HFTokenizer) and run.tokenizer.vocab_size == 300
  assert run.tokenizer.eos_id == 2
  with pytest.raises(ValueError, match='the data needs 500 token ids but model.vocab_size is 384'):
    train.Run(util.config(init_from=str(tmp_path / 'too_big')), str(tmp_path / 'b'))


def test_generate_uses_the_carried_tokenizer(tmp_path):
  """--mode=generate on a converted checkpoint (or a run warm-started from one) encodes and decodes
  with its tokenizer: a WordLevel tokenizer of words w3..w299 continues a prompt with such words;
  one of 500 ids does not fit the 384-id model."""
  import io  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  from retnet_jax import generate  # pylint: disable=g-import-not-at-top
  source = util.model_config()
  for name, vocab in (('fits', 300), ('too_big', 500)):
    checkpoint.save_params(str(tmp_path / name), numpy_params(source), source,
                           extra_meta=hf_tokenizer_meta(vocab))
  config = util.config()
  texts = generate.generate_text(config, str(tmp_path / 'fits'), ['w5 w7 w9'], max_new_tokens=4,
                                 temperature=0.0, out=io.StringIO())
  assert re.fullmatch(r'( ?w\d+)+', texts[0].strip()), texts
  with pytest.raises(ValueError, match="the tokenizer has 500 ids but the checkpoint's model only 384"):
    generate.generate_text(config, str(tmp_path / 'too_big'), ['w5'], max_new_tokens=2,
                           out=io.StringIO())


# ------------------------------------------------------------------------------------------------
# optim.trainable


def test_trainable_updates_only_matching_parameters_and_keeps_no_state_for_others(tmp_path):
  config = util.config(optim__trainable='retention/w[qk]|final_norm', total_steps=2,
                       checkpoint_every=2, eval_every=2)
  run = train.Run(config, None, read_data=False)
  before = checkpoint.flat_paths(jax.device_get(run.initial_state()['params']))
  moments = [x.size for x in jax.tree.leaves(run.abstract_state['opt_state']) if x.ndim > 0]
  trained = {'blocks/retention/wq', 'blocks/retention/wk', 'final_norm/scale'}
  assert sorted(moments) == sorted(2 * [before[p].size for p in trained])  # AdamW's mu and nu.
  train.train_and_evaluate(config, str(tmp_path))
  after, _, _ = checkpoint.load_params(str(tmp_path))
  for path, value in checkpoint.flat_paths(after).items():
    changed = not np.array_equal(np.asarray(value), before[path])
    assert changed == (path in trained), path
  with pytest.raises(ValueError, match="trainable 'nothing_here' matches no parameter"):
    train.Run(util.config(optim__trainable='nothing_here'), None, read_data=False)


def compiled_memory(pattern):
  from retnet_jax import sharding  # pylint: disable=g-import-not-at-top
  run = train.Run(util.config(optim__trainable=pattern), None, read_data=False)
  with sharding.use_rules(run.mesh, run.rules):
    compiled = train.make_train_step(run).lower(run.abstract_train_state(),
                                                run.abstract_batch()).compile()
  return compiled.memory_analysis(), run


def test_frozen_parameters_save_their_optimizer_state_in_the_compiled_step():
  full, run = compiled_memory('')
  part, _ = compiled_memory('retention')
  frozen = sum(x.size * x.dtype.itemsize for p, x in
               checkpoint.flat_paths(run.abstract_state['params']).items() if 'retention' not in p)
  assert full.argument_size_in_bytes - part.argument_size_in_bytes == 2 * frozen
  assert part.temp_size_in_bytes <= full.temp_size_in_bytes


def test_trainable_selects_single_layers_of_a_stacked_parameter(tmp_path):
  """'blocks/retention/wq/1$' trains layer 1's wq only: layer 0's slice and every other parameter
  stay as they were, weight decay included; the stacked wq keeps its optimiser state."""
  config = util.config(optim__trainable='blocks/retention/wq/1$|final_norm', model__num_layers=3,
                       total_steps=2, checkpoint_every=2, eval_every=2)
  run = train.Run(config, None, read_data=False)
  before = checkpoint.flat_paths(jax.device_get(run.initial_state()['params']))
  moments = [x.size for x in jax.tree.leaves(run.abstract_state['opt_state']) if x.ndim > 0]
  assert sorted(moments) == sorted(2 * [before[p].size for p in ('blocks/retention/wq', 'final_norm/scale')])
  train.train_and_evaluate(config, str(tmp_path))
  after = checkpoint.flat_paths(checkpoint.load_params(str(tmp_path))[0])
  wq_before, wq_after = before['blocks/retention/wq'], np.asarray(after['blocks/retention/wq'])
  np.testing.assert_array_equal(wq_after[[0, 2]], wq_before[[0, 2]])
  assert not np.array_equal(wq_after[1], wq_before[1])
  for path, value in after.items():
    if path not in ('blocks/retention/wq', 'final_norm/scale'):
      np.testing.assert_array_equal(np.asarray(value), before[path], err_msg=path)
