r"""Weights in and out of other RetNet codebases, one module per format.

  python -m retnet_jax.convert --from=torchscale --input=retnet.pt --output=/tmp/ts [--config_json=args.json]
  python -m retnet_jax.convert --from=fla --input=/path/to/retnet-1.3B-100B --output=/tmp/fla
  python -m retnet_jax.convert --to=torchscale --input=/tmp/ts --output=retnet.pt

| module | what |
|---|---|
| `reading` | torch `.pt` / `.bin` and safetensors into NumPy, JSON, the Hugging Face tokenizer |
| `checks` | `ConversionError`, name/shape checks of a state dict and of the converted tree |
| `layout` | torch Linear [out, in] <-> our kernels, dtype casts, γ and rotary buffers |
| `torchscale` | `torchscale.architecture.retnet.RetNetDecoder`, both ways |
| `fla` | `fla.models.RetNetForCausalLM` (flash-linear-attention) |
| `cli` | the command above |

The output of an import is a params-only orbax checkpoint (`checkpoint.load_params(dir)` reads it);
its meta holds the ModelConfig variant that reproduces the source architecture, 'source' (format
and input path) and, when a `tokenizer.json` lies beside the input, 'tokenizer':
{'kind': 'huggingface', 'path', 'json' (the tokenizer file's text, when the `tokenizers` package is
importable), 'vocab_size', 'bos_token_id'?, 'eos_token_id'?, 'pad_token_id'?}; `load_hf_tokenizer(meta)`
rebuilds it as a `tokenizers.Tokenizer`.
"""

from retnet_jax.convert.checks import ConversionError
from retnet_jax.convert.cli import export_checkpoint
from retnet_jax.convert.cli import import_checkpoint
from retnet_jax.convert.cli import main
from retnet_jax.convert.reading import load_hf_tokenizer

__all__ = ['ConversionError', 'export_checkpoint', 'import_checkpoint', 'load_hf_tokenizer', 'main']
