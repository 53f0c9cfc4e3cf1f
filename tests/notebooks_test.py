"""The Colab notebooks run top to bottom (nbclient, kernel python3) on a tiny model and budget."""

import os

from nbclient import NotebookClient
import nbformat
import pytest

from tests import util

# A tiny model and budget, passed to the notebooks through the environment they read.
TINY = ('model.num_layers=1;model.embed_dim=32;model.value_dim=64;model.ffn_dim=64;seq_len=32;'
        'batch_size=4;data.num_eval_batches=1')


def run_notebook(name, tmp_path, monkeypatch):
  monkeypatch.setenv('RETNET_NOTEBOOK_STEPS', '2')
  monkeypatch.setenv('RETNET_NOTEBOOK_OVERRIDES', TINY)
  monkeypatch.setenv('RETNET_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('RETNET_NOTEBOOK_SCHEDULES', 'retnet,none,learnable')
  monkeypatch.setenv('RETNET_NOTEBOOK_GEN_TOKENS', '8')
  # The kernel gets one CPU device, as a CPU runtime has (conftest asks for 8 for this process).
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device_count'))
  monkeypatch.setenv('XLA_FLAGS', flags)
  nb = nbformat.read(os.path.join(util.ROOT, 'colab', name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': util.ROOT}}).execute()  # Raises on a cell error.
  return nb


def outputs_text(nb):
  texts = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      texts.append(out.get('text', '') or ''.join(out.get('data', {}).get('text/plain', '')))
  return '\n'.join(texts)


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
  nb = run_notebook('quickstart.ipynb', tmp_path, monkeypatch)
  text = outputs_text(nb)
  assert 'backend: cpu' in text and 'mesh axes:' in text
  assert 'final eval:' in text and '--- step 2 ---' in text
  assert os.path.exists(tmp_path / 'quickstart' / 'metrics.jsonl')
  assert any(out.get('output_type') == 'display_data' and 'image/png' in out.get('data', {})
             for cell in nb.cells for out in cell.get('outputs', []))  # The loss plot.


@pytest.mark.slow
def test_gamma_ablation(tmp_path, monkeypatch):
  nb = run_notebook('gamma_ablation.ipynb', tmp_path, monkeypatch)
  out = tmp_path / 'gamma_ablation'
  for name in ('table.md', 'results.csv', 'loss_curves.png', 'decay_per_head.png',
               'learnable_gamma.png'):
    assert (out / name).exists(), name
  pngs = [o for cell in nb.cells for o in cell.get('outputs', [])
          if 'image/png' in o.get('data', {})]
  assert len(pngs) == 3
  shown = [o['data']['text/markdown'] for cell in nb.cells for o in cell.get('outputs', [])
           if 'text/markdown' in o.get('data', {})]
  assert any('| learnable |' in md and '| none |' in md for md in shown)  # The table.
