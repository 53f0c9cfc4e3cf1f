"""Every config loads, validates and documents its run command; each config argument does what it
says, a bad one is a one-line error naming it; the paper sizes are the paper's."""

import dataclasses
import glob
import os

from absl import flags
from flax import nnx
from ml_collections import config_flags
import pytest

import configs
from configs import mqar
from retnet_jax import config_lib
from retnet_jax import main
from retnet_jax import model as model_lib
from tests import util

CONFIGS = sorted(p for p in glob.glob(os.path.join(util.ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))
TINY = os.path.join(util.ROOT, 'configs', 'retnet_tiny.py')
TRANSFORMER = os.path.join(util.ROOT, 'configs', 'transformer_tiny.py')
MQAR = os.path.join(util.ROOT, 'configs', 'mqar.py')


def plain(config) -> dict:
  """{'a.b': value} of every leaf."""
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update({f'{key}.{k}': v for k, v in plain(value).items()})
    else:
      out[key] = value
  return out


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_loads_and_validates(path):
  c = config_lib.load(path)
  config_lib.validate(c)
  for key in ('seed', 'total_steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'checkpoint_every'):
    assert key in c
  with open(path) as f:
    assert 'python -m retnet_jax.main --config=configs/' in f.read()


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_model_section_has_every_model_field(path):
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  assert set(config_lib.load(path).model) == fields


def test_a_new_model_field_reaches_every_config_at_its_default(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Wider(model_lib.ModelConfig):
    new_field: int = 7

  monkeypatch.setattr(model_lib, 'ModelConfig', Wider)
  for path in CONFIGS:
    assert config_lib.load(path).model.new_field == 7, path
  assert config_lib.model_config(config_lib.load(TINY)).new_field == 7


def test_model_defaults_state_only_what_differs():
  model = config_lib.model_defaults(num_layers=3, remat='full')
  assert (model.num_layers, model.remat) == (3, 'full')
  default = model_lib.ModelConfig()
  assert model.embed_dim == default.embed_dim and model.gamma == default.gamma
  with pytest.raises(ValueError, match=r"unknown model field\(s\) \['num_layer'\]"):
    config_lib.model_defaults(num_layer=3)


@pytest.mark.parametrize('path', [TINY, TRANSFORMER], ids=os.path.basename)
@pytest.mark.parametrize('preset', sorted(configs.PRESETS))
def test_presets_set_their_values_and_nothing_else(path, preset):
  full, shrunk = plain(config_lib.load(path)), plain(config_lib.load(f'{path}:{preset}'))
  config_lib.validate(config_lib.load(f'{path}:{preset}'))
  expected = dict(configs.PRESETS[preset])
  if full['model.kind'] == 'transformer':
    expected.pop('model.value_dim')  # Attention's value width stays embed_dim.
  assert {k: shrunk[k] for k in expected} == expected
  assert {k: v for k, v in shrunk.items() if k not in expected} == {
      k: v for k, v in full.items() if k not in expected}


def test_preset_values():
  """The sizes the tests and the experiments' --quick rely on."""
  test = config_lib.load(f'{TINY}:test')
  assert (test.seq_len, test.model.num_heads, test.model.chunk_size, test.total_steps) == (37, 3, 16, 6)
  assert all(test.seq_len % c for c in (2, 4, 8, 16, 32, 64))  # No chunk size divides it.
  quick = config_lib.load(f'{TINY}:quick')
  assert (quick.model.num_layers, quick.model.embed_dim, quick.seq_len, quick.batch_size,
          quick.total_steps) == (2, 128, 128, 8, 400)
  assert config_lib.load(f'{TRANSFORMER}:test').model.value_dim is None


def test_arguments_combine_with_presets_and_overrides():
  c = config_lib.load(f'{TINY}:gamma=lm, quick ,ablation=no_gate',
                      ['total_steps=7', 'model.num_layers=1'])
  assert (c.model.gamma, c.model.swish_gate, c.total_steps, c.model.num_layers) == ('lm', False, 7, 1)
  assert c.model.embed_dim == 128  # quick
  # A preset is applied last: it wins over the argument's own sizes.
  assert config_lib.load(f'{TINY}:ablation=small_head,test').model.num_heads == 3
  c = config_lib.load(f'{TRANSFORMER}:ablation=no_gate,test')
  assert (c.model.kind, c.model.swish_gate, c.model.embed_dim) == ('transformer', False, 48)
  c = config_lib.load(f'{MQAR}:kind=transformer,kv=4,width=64,quick')
  assert (c.model.kind, c.data.mqar_num_kv_pairs, c.model.embed_dim) == ('transformer', 4, 64)
  assert {k: plain(c)[k] for k in mqar.PRESETS['quick']} == mqar.PRESETS['quick']
  assert config_lib.load(MQAR).seq_len == 128


def test_config_lib_load_matches_the_command_line():
  for arg in ('', ':gamma=custom,test', ':quick'):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=False)
    flag_values(['main', f'--config={TINY}{arg}'])
    assert plain(flag_values.config) == plain(config_lib.load(TINY + arg)), arg


@pytest.mark.parametrize('path,arg,names', [
    (TINY, 'gama=lm', "'gama=lm'"),
    (TINY, 'fast', "'fast'"),
    (TINY, 'quick=1', "'quick=1'"),
    (TINY, 'gamma', "'gamma'"),
    (TRANSFORMER, 'qiuck', "'qiuck'"),
    (MQAR, 'test', "'test'"),
    (os.path.join(util.ROOT, 'configs', 'retnet_paper.py'), '1.3b,slise=v5e-32', "'slise=v5e-32'"),
])
def test_bad_argument_is_a_one_line_error_naming_it(path, arg, names):
  with pytest.raises(ValueError, match='unknown config argument') as e:
    config_lib.load(f'{path}:{arg}')
  assert names in str(e.value) and '\n' not in str(e.value)
  # The command line reports the same line before absl's parser would print a traceback.
  message = main.check_config_overrides(['main', f'--config={path}:{arg}'])
  assert names in message and '\n' not in message


def test_bad_values_and_presets_together():
  with pytest.raises(ValueError, match='unknown ablation'):
    config_lib.load(TINY + ':ablation=fast')
  with pytest.raises(ValueError, match=r"\['quick', 'test'\] exclude each other"):
    config_lib.load(TINY + ':test,quick')
  with pytest.raises(ValueError, match='does not exist'):
    config_lib.load(os.path.join(util.ROOT, 'configs', 'nope.py'))


def test_parse_config_arg():
  assert config_lib.parse_config_arg(' a=1, b = x ,f,', ('a', 'b'), ('f', 'g')) == {
      'a': '1', 'b': 'x', 'f': True}
  assert config_lib.parse_config_arg(None, ('a',)) == {}
  with pytest.raises(ValueError, match=r"unknown config argument 'c=2'; this config takes: a=\.\.\., f\."):
    config_lib.parse_config_arg('a=1,c=2', ('a',), ('f',))


def test_one_walker_for_dotted_keys():
  c = config_lib.load(TINY, ['model.num_layers=3', 'optim.learning_rate=1e-3', 'name=x y'])
  assert (c.model.num_layers, c.optim.learning_rate, c.name) == (3, 1e-3, 'x y')
  config_lib.update(c, {'mesh.rules.kv': 'tensor', 'seed': 5})
  assert (config_lib.lookup(c, 'mesh.rules.kv'), c.seed) == ('tensor', 5)
  with pytest.raises(ValueError, match="unknown config key 'model.numlayers': config.model has no "
                     "'numlayers' \\(its keys: .*num_layers"):
    config_lib.load(TINY, ['model.numlayers=3'])
  with pytest.raises(ValueError, match="config.seed has no 'x'"):
    config_lib.lookup(c, 'seed.x')
  with pytest.raises(ValueError, match="unknown config key 'modle.num_layers': config has no 'modle'"):
    config_lib.update(c, {'modle.num_layers': 1})
  assert main.check_config_overrides(
      ['main', f'--config={TINY}', '--config.model.num_layers=1', '--config.optim.b3=2']
  ).startswith("unknown config key 'optim.b3': config.optim has no 'b3'")
  assert main.check_config_overrides(['main', f'--config={TINY}:test', '--config.seed=1']) is None


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


def test_paper_arguments():
  path = os.path.join(util.ROOT, 'configs', 'retnet_paper.py')
  assert config_lib.load(path + ':1.3b,slice=v5e-32').optim.grad_accum_steps == 32
  c = config_lib.load(path + ':size=2.7b,kind=transformer')
  assert (c.model.kind, c.model.value_dim, c.model.num_layers) == ('transformer', None, 32)
  with pytest.raises(ValueError, match="no settings for 1.3b on 'v5p-128'"):
    config_lib.load(path + ':1.3b,slice=v5p-128')
