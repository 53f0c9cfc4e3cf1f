"""The GPU check without a GPU: the carried wheel list, the budget, kernel_bench's quick setting,
and the whole check end to end in its dry run (tiny shapes, interpreted kernels, fla's torch
reference)."""

import email.parser
import json
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

from experiments import gpu_check
from tests import util

LIST = os.path.join(util.ROOT, 'experiments', 'carry', 'wheels.txt')
ACCELERATORS = os.path.join(util.ROOT, 'requirements-accelerators.txt')
TARGET = {'python_version': '3.12', 'python_full_version': '3.12.3', 'sys_platform': 'linux',
          'platform_system': 'Linux', 'platform_machine': 'x86_64', 'os_name': 'posix',
          'implementation_name': 'cpython', 'platform_python_implementation': 'CPython'}


def _wheel_requirements(folder):
  """{name: (version, [Requirement])} read from the METADATA of every wheel in `folder`."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  out = {}
  for name in sorted(os.listdir(folder)):
    if not name.endswith('.whl'):
      continue
    with zipfile.ZipFile(os.path.join(folder, name)) as z:
      meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
      headers = email.parser.Parser().parsestr(z.read(meta).decode())
    out[gpu_check._canonical(headers['Name'])] = (  # pylint: disable=protected-access
        headers['Version'], [Requirement(r) for r in headers.get_all('Requires-Dist') or ()])
  return out


def _closure(wheels, roots, machine, skip):
  """The names the roots need on the GPU machine (Python 3.12, Linux x86-64) by the wheels' own
  requirements, not descending into the machine's packages or the skipped ones; the skipped
  names reached; and each requirement that a listed version does not satisfy."""
  seen, reached_skips, unmet, done = set(), set(), [], set()
  todo = [(r, ()) for r in roots]
  while todo:
    name, extras = todo.pop()
    key = gpu_check._canonical(name)  # pylint: disable=protected-access
    if key in machine:
      continue
    if key in skip:
      reached_skips.add(key)
      continue
    if (key, extras) in done:
      continue
    done.add((key, extras))
    seen.add(key)
    if key not in wheels:
      continue  # Reported as missing by the caller.
    for req in wheels[key][1]:
      if req.marker is not None and not any(
          req.marker.evaluate({**TARGET, 'extra': e}) for e in ('', *extras)):
        continue
      if req.marker is not None and 'extra' in str(req.marker) and not any(
          req.marker.evaluate({**TARGET, 'extra': e}) for e in extras):
        continue  # A requirement of an extra that was not asked for.
      dep = gpu_check._canonical(req.name)  # pylint: disable=protected-access
      if dep in wheels and not req.specifier.contains(wheels[dep][0], prereleases=True):
        unmet.append(f'{key}: {req} (listed {wheels[dep][0]})')
      todo.append((req.name, tuple(req.extras)))
  return seen, reached_skips, unmet


def test_wheel_list_is_consistent_with_itself_and_the_pin_files():
  """Without network: every pin of the accelerator file is carried at its version, the roots and
  the project's dependencies are carried, left out on purpose or on the machine, and nothing the
  machine has is carried."""
  listed = gpu_check.read_wheel_list(LIST)
  pins = gpu_check.read_wheel_list(ACCELERATORS)
  roots = set(gpu_check.wheel_list_names('ROOTS', LIST))
  machine = set(gpu_check.wheel_list_names('MACHINE', LIST))
  skip = set(gpu_check.wheel_list_names('SKIP', LIST))
  assert {'jax', 'jaxlib', 'numpy', 'torch', 'triton'} <= machine
  assert {'flax', 'grain', 'ml-collections', 'flash-linear-attention', 'fla-core'} <= set(listed)
  assert {n: listed.get(n) for n in pins} == pins
  assert not machine & set(listed) and not skip & set(listed)
  assert roots <= set(listed) | skip, sorted(roots - set(listed) - skip)
  with open(os.path.join(util.ROOT, 'pyproject.toml'), 'rb') as f:
    deps = tomllib.load(f)['project']['dependencies']
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  for dep in map(Requirement, deps):
    name = gpu_check._canonical(dep.name)  # pylint: disable=protected-access
    assert name in set(listed) | machine | skip, name
    if name in listed and (dep.marker is None or dep.marker.evaluate(TARGET)):
      assert dep.specifier.contains(listed[name]), (str(dep), listed[name])


def test_accelerator_pins_hold_a_flax_that_imports_on_current_jax():
  pins = gpu_check.read_wheel_list(ACCELERATORS)
  from packaging.version import Version  # pylint: disable=g-import-not-at-top
  assert Version(pins['flax']) >= Version('0.12.10')  # nnx's NewVariable on jax >= 0.11.
  assert not {'jax', 'jaxlib', 'libtpu'} & set(pins)  # The machine's jax is never replaced.


def _download(tmp_path, path):
  cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
         '--python-version', '3.12', '--implementation', 'cp', '--platform',
         'manylinux_2_28_x86_64', '--platform', 'manylinux2014_x86_64', '-d', str(tmp_path),
         '-r', path]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  if proc.returncode and ('Network' in proc.stderr or 'connection' in proc.stderr.lower()):
    pytest.skip('no network to the package index')
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_wheel_list_is_the_requirement_closure_of_its_roots_for_python_312(tmp_path):
  """Downloads every carried wheel for Python 3.12 (so each pin, those of the accelerator file
  included, resolves there) and reads the closure from the wheels' own metadata: nothing of the
  local Python's installed versions enters."""
  pytest.importorskip('packaging')
  _download(tmp_path, LIST)
  wheels = _wheel_requirements(tmp_path)
  listed = gpu_check.read_wheel_list(LIST)
  assert {n: v for n, (v, _) in wheels.items()} == listed
  closure, reached_skips, unmet = _closure(
      wheels, gpu_check.wheel_list_names('ROOTS', LIST),
      set(gpu_check.wheel_list_names('MACHINE', LIST)),
      set(gpu_check.wheel_list_names('SKIP', LIST)))
  assert closure == set(listed), (
      f'missing {sorted(closure - set(listed))}, extra {sorted(set(listed) - closure)}')
  assert not unmet, unmet
  skip = set(gpu_check.wheel_list_names('SKIP', LIST))
  assert skip == reached_skips, f'stale SKIP entries: {sorted(skip - reached_skips)}'


def test_wheel_download_step_fetches_the_list_for_python_312_manylinux():
  with open(os.path.join(util.ROOT, 'experiments', 'carry', 'wheels.sh')) as f:
    script = f.read()
  for flag in ('--no-deps', '--only-binary=:all:', '--python-version 3.12', '--implementation cp',
               '--platform manylinux_2_28_x86_64', '--platform manylinux2014_x86_64',
               '-r experiments/carry/wheels.txt', 'dest=${1:-.whl}'):
    assert flag in script, flag
  with open(os.path.join(util.ROOT, '.gitignore')) as f:
    assert '/.whl/' in f.read().split()


def test_budget_spent_skips_every_part_and_still_writes_the_outputs(tmp_path):
  rc = gpu_check.check(str(tmp_path), dry_run=True, budget_s=0, log=lambda s: None)
  assert rc == 0
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert list(results['parts']) == list(gpu_check.PART_NAMES)
  for record in results['parts'].values():
    assert record['status'] == 'skipped' and record['reason'].startswith('budget'), record
  assert '| kernels | skipped |' in (tmp_path / 'table.md').read_text()


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path):
  class Broken(gpu_check.Check):
    def part_env(self, record):
      raise RuntimeError('no such device')

    def part_model(self, record):
      self.item(record, name='ran', ok=True)

  results = Broken(str(tmp_path), dry_run=True, budget_s=60, parts=('env', 'model'),
                   log=lambda s: None).run()
  assert results['parts']['env']['status'] == 'failed'
  assert 'RuntimeError: no such device' in results['parts']['env']['error']
  assert results['parts']['model']['status'] == 'ok'
  with pytest.raises(ValueError, match='unknown parts'):
    gpu_check.Check(str(tmp_path), dry_run=True, budget_s=1, parts=('nope',)).run()


def test_kernel_bench_quick_times_every_implementation_and_they_agree(tmp_path):
  pytest.importorskip('torch', reason='fla\'s torch reference is timed beside ours')
  env = {**os.environ, 'PYTHONPATH': util.ROOT}
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.kernel_bench', '--quick', f'--output_dir={tmp_path}'],
      cwd=util.ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  timed = [it for it in results['items'] if 'impl' in it]
  assert {it['impl'] for it in timed} == {'pallas', 'xla', 'xla_attention', 'fla_naive'}
  assert all(it['ok'] and it['ms'] > 0 for it in timed), timed
  agree = {it['other']: it for it in results['items'] if it.get('kind') == 'agreement'}
  assert set(agree) == {'xla', 'fla_naive'} and all(it['ok'] for it in agree.values()), agree
  assert '| 64 |' in (tmp_path / 'table.md').read_text()


def test_dry_run_end_to_end(tmp_path):
  pytest.importorskip('torch', reason='the dry run times fla torch references')
  env = {**os.environ, 'PYTHONPATH': util.ROOT}
  env.pop('OUT', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.gpu_check', '--dry_run', f'--output_dir={tmp_path}'],
      cwd=util.ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  parts = results['parts']
  for name in gpu_check.PART_NAMES:
    allowed = ('ok', 'skipped') if name == 'fla_parity' else ('ok',)
    assert parts[name]['status'] in allowed, (name, parts[name])
  kernels = parts['kernels']['items']
  assert len(kernels) == 1 and kernels[0]['ok'] and not kernels[0]['compiled']
  assert ' passed' in kernels[0]['summary'], kernels[0]
  assert all(it['ok'] for it in parts['model']['items'])
  timed = [it for it in parts['kernel_timing']['items'] if 'impl' in it]
  assert {it['impl'] for it in timed} >= {'pallas', 'fla_naive'}
  assert all(it['ms'] > 0 for it in timed)
  assert any(it.get('kind') == 'agreement' and it['ok'] for it in parts['kernel_timing']['items'])
  assert all(it['ok'] and it['tokens_per_s'] > 0 for it in parts['train_step']['items'])
  assert all(it['ok'] and it['ms_per_token'] > 0 for it in parts['decode']['items'])
  table = (tmp_path / 'table.md').read_text()
  for heading in ('## Kernel tests', '## Kernel time', '## Train step', '## Decoding'):
    assert heading in table
