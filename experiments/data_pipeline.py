r"""The pretraining data path at scale: preprocess throughput, the input pipeline's delivered
tokens/s against the tiny model's train step, and the training process's peak memory by corpus size.

  python -m experiments.data_pipeline --output_dir=/tmp/data_pipeline [--large_mb=1000]

In one run, in a temporary directory deleted at the end (about 4 GB at the default sizes):
  1. Corpora of jsonl documents: the standard library's .py files, cycled with a copy number in front
     of each so that no two documents are the same, of --small_mb (10), --throughput_mb (100) and
     --large_mb (1000) MB.
  2. `preprocess.run` (byte tokenizer) on the throughput corpus with 1 and 2 workers, and on the
     small and large ones with 2: MB of input per second, wall clock from start to metadata.
  3. The input pipeline (`data.create_datasets`, source='arrayrecord', the tiny config's batch 16 ×
     256 and its prefetch settings, no worker processes) on the large output: tokens per second
     delivered over --pipeline_batches batches after a warm-up.
  4. `python -m retnet_jax.main` on configs/retnet_tiny.py reading each of the small and large
     outputs for --train_steps steps (eval at the end): the train step's tokens/s from its last log
     window, and the process's peak resident memory (wait4's ru_maxrss).
What it checks: pipeline tokens/s >= 10x the step's; peak RSS with the large corpus within
100 MB of the small one's.

Outputs in --output_dir: results.json and table.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from absl import app
from absl import flags

from retnet_jax import data
from retnet_jax import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_PIPELINE_RATIO = 10.0
TARGET_RSS_GROWTH_MB = 100.0

_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where results.json and table.md go.')
_SMALL_MB = flags.DEFINE_float('small_mb', 10, 'Small corpus, MB of jsonl.')
_THROUGHPUT_MB = flags.DEFINE_float('throughput_mb', 100, 'Corpus for the 1- vs 2-worker rates.')
_LARGE_MB = flags.DEFINE_float('large_mb', 1000, 'Large corpus, MB of jsonl.')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 400, 'Batches timed in step 3.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 30, 'Training steps per run in step 4.')
_TMP = flags.DEFINE_string('tmp_dir', None, 'Parent of the temporary directory (default: system).')


def stdlib_documents() -> list[str]:
  root = sysconfig.get_paths()['stdlib']
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', '__pycache__'))
    for name in sorted(filenames):
      if name.endswith('.py'):
        with open(os.path.join(dirpath, name), encoding='utf-8', errors='replace') as f:
          text = f.read()
        if text.strip():
          docs.append(text)
  return docs


def write_corpus(path: str, megabytes: float, docs: list[str]) -> int:
  """Writes about `megabytes` MB of jsonl to `path`, cycling `docs`; returns the bytes written."""
  target, written, copy = int(megabytes * 1e6), 0, 0
  with open(path, 'w', encoding='utf-8') as f:
    while written < target:
      for doc in docs:
        line = json.dumps({'text': f'# copy {copy}\n{doc}'}) + '\n'
        f.write(line)
        written += len(line.encode('utf-8'))
        if written >= target:
          break
      copy += 1
  return written


def run_preprocess(corpus: str, output: str, workers: int) -> dict:
  t0 = time.perf_counter()
  meta = preprocess.run(preprocess.Args(input=corpus, output=output, num_workers=workers,
                                        progress_every=30.0))
  seconds = time.perf_counter() - t0
  size = os.path.getsize(corpus)
  return {'corpus_mb': size / 1e6, 'workers': workers, 'seconds': seconds,
          'mb_per_second': size / 1e6 / seconds,
          'tokens': sum(meta['splits'][s]['tokens'] for s in preprocess.SPLITS),
          'documents': sum(meta['splits'][s]['documents'] for s in preprocess.SPLITS)}


def pipeline_rate(path: str, batches: int, seq_len: int = 256, batch_size: int = 16) -> dict:
  config = {'source': 'arrayrecord', 'path': path}
  tok = data.get_tokenizer(config)
  it, _ = data.create_datasets(config, tokenizer=tok, seq_len=seq_len, global_batch_size=batch_size,
                               seed=0, process_index=0, process_count=1)
  for _ in range(20):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  return {'batches': batches, 'seconds': seconds,
          'tokens_per_second': batches * seq_len * batch_size / seconds}


def train_run(path: str, workdir: str, steps: int) -> dict:
  """The real entry point in a child process: its peak RSS and its last window's tokens/s."""
  cmd = [sys.executable, '-m', 'retnet_jax.main', '--config=configs/retnet_tiny.py',
         f'--workdir={workdir}', '--config.data.source=arrayrecord', f'--config.data.path={path}',
         f'--config.total_steps={steps}', f'--config.log_every={max(steps // 3, 1)}',
         f'--config.eval_every={steps}', f'--config.checkpoint_every={steps}',
         '--config.data.num_eval_batches=4']
  env = {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  stderr = proc.stderr.read()
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f'training failed ({proc.returncode}): {stderr[-2000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    train_records = [r for r in map(json.loads, f) if r['split'] == 'train']
  return {'peak_rss_mb': usage.ru_maxrss / 1024, 'seconds': time.perf_counter() - t0,
          'step_tokens_per_second': train_records[-1]['tokens_per_second'],
          'final_loss': train_records[-1]['loss']}


def run(output_dir: str, *, small_mb=10.0, throughput_mb=100.0, large_mb=1000.0,
        pipeline_batches=400, train_steps=30, tmp_dir=None) -> dict:
  os.makedirs(output_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='data_pipeline_', dir=tmp_dir)
  results = {}
  try:
    docs = stdlib_documents()
    corpora = {}
    for name, mb in [('small', small_mb), ('throughput', throughput_mb), ('large', large_mb)]:
      corpora[name] = os.path.join(tmp, f'{name}.jsonl')
      write_corpus(corpora[name], mb, docs)
    del docs
    results['preprocess'] = [
        run_preprocess(corpora['throughput'], os.path.join(tmp, f'tp{w}'), w) for w in (1, 2)]
    shutil.rmtree(os.path.join(tmp, 'tp1'))
    shutil.rmtree(os.path.join(tmp, 'tp2'))
    os.remove(corpora['throughput'])
    for name in ('small', 'large'):
      results['preprocess'].append(run_preprocess(corpora[name], os.path.join(tmp, name), 2))
      os.remove(corpora[name])  # The training runs read the shards only.
    results['pipeline'] = pipeline_rate(os.path.join(tmp, 'large'), pipeline_batches)
    results['train'] = {name: train_run(os.path.join(tmp, name), os.path.join(tmp, f'w_{name}'),
                                        train_steps) for name in ('small', 'large')}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  step = results['train']['small']['step_tokens_per_second']
  results['pipeline_over_step'] = results['pipeline']['tokens_per_second'] / step
  results['rss_growth_mb'] = (results['train']['large']['peak_rss_mb'] -
                              results['train']['small']['peak_rss_mb'])
  results['targets'] = {
      'pipeline_over_step >= 10': results['pipeline_over_step'] >= TARGET_PIPELINE_RATIO,
      'rss_growth_mb <= 100': abs(results['rss_growth_mb']) <= TARGET_RSS_GROWTH_MB}
  with open(os.path.join(output_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  lines = ['| preprocess | corpus MB | workers | seconds | MB/s |', '|---|---|---|---|---|']
  lines += [f"| | {p['corpus_mb']:.0f} | {p['workers']} | {p['seconds']:.1f} | {p['mb_per_second']:.1f} |"
            for p in results['preprocess']]
  lines += ['', '| training run | peak RSS MB | step tokens/s | final loss |', '|---|---|---|---|']
  lines += [f"| {n} ({small_mb if n == 'small' else large_mb:.0f} MB) | {r['peak_rss_mb']:.0f} | "
            f"{r['step_tokens_per_second']:.0f} | {r['final_loss']:.3f} |"
            for n, r in results['train'].items()]
  lines += ['', f"pipeline: {results['pipeline']['tokens_per_second']:,.0f} tokens/s = "
            f"{results['pipeline_over_step']:.1f}x the step's; peak RSS growth "
            f"{results['rss_growth_mb']:+.0f} MB; targets: {results['targets']}"]
  with open(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return results


def main(argv):
  del argv
  run(_OUTPUT_DIR.value, small_mb=_SMALL_MB.value, throughput_mb=_THROUGHPUT_MB.value,
      large_mb=_LARGE_MB.value, pipeline_batches=_PIPELINE_BATCHES.value,
      train_steps=_TRAIN_STEPS.value, tmp_dir=_TMP.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['output_dir'])
  app.run(main)
