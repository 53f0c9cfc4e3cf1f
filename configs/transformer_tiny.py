r"""The Transformer baseline at retnet_tiny's size: the same config with softmax attention + KV cache.

Same embedding, pre-norm, SwiGLU FFN, rotary positions, data and training; value_dim = embed_dim, and
a wider FFN makes up for attention's fewer parameters (q, k, v, o: 4·D² against retention's
2·D² + 3·D·V), so the parameter counts match (tests/generate_test.py checks within 5%). The FFN width
is computed from retnet_tiny's config here, so it stays matched when retnet_tiny changes.

  python -m retnet_jax.main --config=configs/transformer_tiny.py --workdir=/tmp/transformer_tiny

The argument is retnet_tiny's (`:quick`, `:test`, `:ablation=...`, ...).
"""

import configs
from configs import retnet_tiny
from retnet_jax import config_lib


def count_params(model_dict) -> int:
  """Parameters of the model a config.model dict describes (shapes only, nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  values = dict(model_dict)
  values['gamma_values'] = tuple(values.get('gamma_values') or ())
  cfg = model_lib.ModelConfig(**values)
  abstract = nnx.eval_shape(lambda: model_lib.Model(cfg, rngs=nnx.Rngs(0)))
  return model_lib.count_params(nnx.state(abstract, nnx.Param))


def matched_ffn_dim(retnet_model: dict, multiple: int = 8) -> int:
  """The FFN width (a multiple of `multiple`) that gives the Transformer retnet_model's parameter count."""
  target = count_params(retnet_model)
  base = {**retnet_model, 'kind': 'transformer', 'value_dim': None}
  have = count_params(base)
  per_unit = 3 * retnet_model['embed_dim'] * retnet_model['num_layers']  # gate, up, down
  ffn = retnet_model['ffn_dim'] + (target - have) / per_unit
  return max(multiple, int(round(ffn / multiple)) * multiple)


def to_transformer(c):
  """Turns a retnet config (ConfigDict) into its parameter-matched Transformer, in place."""
  c.model.ffn_dim = matched_ffn_dim(c.model.to_dict())
  c.model.kind = 'transformer'
  c.model.value_dim = None
  c.name = c.get('name', 'retnet_tiny').replace('retnet', 'transformer')
  return c


def get_config(arg=None):
  """retnet_tiny's arguments; a preset (quick, test) shrinks the Transformer after matching."""
  args = config_lib.parse_config_arg(arg, retnet_tiny.KEYS, tuple(configs.PRESETS))
  return configs.apply_preset(to_transformer(retnet_tiny.base_config(args)), args)
