"""Every config loads, validates, documents its run command, and the paper sizes are the paper's."""

import glob
import os

import pytest
from flax import nnx

from retnet_jax import config_lib
from retnet_jax import model as model_lib
from tests import util

CONFIGS = sorted(glob.glob(os.path.join(util.ROOT, 'configs', '*.py')))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_validates(path):
  c = config_lib.load(path)
  config_lib.validate(c)
  for key in ('seed', 'total_steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'checkpoint_every'):
    assert key in c
  with open(path) as f:
    assert 'python -m retnet_jax.main --config=configs/' in f.read()


@pytest.mark.parametrize('name,layers,hidden,ffn,heads', [
    ('retnet_1_3b', 24, 2048, 4096, 8), ('retnet_2_7b', 32, 2560, 5120, 10),
    ('retnet_6_7b', 32, 4096, 8192, 16)])
def test_paper_sizes(name, layers, hidden, ffn, heads):
  c = config_lib.load(os.path.join(util.ROOT, 'configs', f'{name}.py'))
  cfg = config_lib.model_config(c)
  assert (cfg.num_layers, cfg.embed_dim, cfg.ffn_dim, cfg.num_heads) == (layers, hidden, ffn, heads)
  assert cfg.head_dim == 256 and cfg.value_head_dim == 512
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip) == (0.9, 0.98, 0.05, 2.0)
  assert c.optim.warmup_steps == 375 and cfg.dropout == 0.1
  assert c.optim.learning_rate == (6e-4 if name == 'retnet_1_3b' else 3e-4)
  abstract = model_lib.abstract_model(cfg)
  assert model_lib.count_params(nnx.state(abstract)) > 1e9


def test_config_arguments_and_overrides():
  path = os.path.join(util.ROOT, 'configs', 'retnet_tiny.py')
  c = config_lib.load(path + ':gamma=lm,ablation=no_gate', ['total_steps=7', 'model.num_layers=1'])
  assert (c.model.gamma, c.model.swish_gate, c.total_steps, c.model.num_layers) == ('lm', False, 7, 1)
  with pytest.raises(ValueError, match='unknown config argument'):
    config_lib.load(path + ':gama=lm')
  with pytest.raises(ValueError, match='unknown ablation'):
    config_lib.load(path + ':ablation=fast')
  with pytest.raises(ValueError, match="unknown config key 'model.numlayers'"):
    config_lib.load(path, ['model.numlayers=3'])
  with pytest.raises(ValueError, match='does not exist'):
    config_lib.load(os.path.join(util.ROOT, 'configs', 'nope.py'))
