"""Every `python -m retnet_jax...` / `python -m experiments...` command in a fenced code block of
README.md or docs/*.md parses its flags against today's code.

One subprocess imports what the documented modules import, then forks once per command; each child
runs the module's `__main__` code with `absl.app.run` and `argparse.ArgumentParser.parse_args`
stopped right after parsing, so every command meets fresh flags: every `--flag` must be defined,
`--config=FILE[:ARG]` must load and each `--config.a.b=value` must apply. Nothing is trained,
converted or compiled. Also: every relative link reaches its file and heading, and the README
links every docs page.

  python -m tests.docs_test < commands.json   # the runner: {module: [argv]} -> {module: [error]}
"""

import argparse
import glob
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_RE = re.compile(r'^(retnet_jax|experiments)(\.\w+)*$')
_FENCE_RE = re.compile(r'^\s*(```|~~~)')
_SEPARATORS = ('&&', '||', ';', '|')


def doc_files(root=ROOT):
  return [os.path.join(root, 'README.md')] + sorted(glob.glob(os.path.join(root, 'docs', '*.md')))


def fenced_lines(text):
  """(line number, line) of every line inside a fenced code block; a line ending in a backslash
  is joined with the next, reported at its first line."""
  out, inside, pending, start = [], False, '', 0
  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE_RE.match(line):
      inside, pending = not inside, ''
      continue
    if not inside:
      continue
    if not pending:
      start = number
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    out.append((start, pending + line))
    pending = ''
  return out


def split_commands(line):
  """The `python -m MODULE ...` commands of one shell line, as (module, argv after the module).
  Commands are split at &&, ||, ; and |; words before `python` (VAR=value, `timeout 60`) are
  dropped; $'...' strings are read as plain quotes. Raises ValueError on unbalanced quotes."""
  lexer = shlex.shlex(line.replace("$'", "'"), posix=True, punctuation_chars=';&|')
  lexer.whitespace_split, lexer.commenters = True, '#'
  commands, current = [], []
  for token in list(lexer) + ['&&']:
    if token not in _SEPARATORS:
      current.append(token)
      continue
    for i in range(len(current) - 2):
      if (re.match(r'^python3?(\.\d+)?$', os.path.basename(current[i])) and current[i + 1] == '-m'
          and MODULE_RE.match(current[i + 2])):
        commands.append((current[i + 2], current[i + 3:]))
        break
    current = []
  return commands


def documented_commands(files=None, errors=None):
  """{module: [(where, argv)]} over the docs; `where` is 'FILE:LINE'. Lines that mention such a
  command but do not split as shell words go to `errors` as 'FILE:LINE: why'."""
  found = {}
  for path in files or doc_files():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    for number, line in fenced_lines(text):
      where = f'{os.path.relpath(path, ROOT)}:{number}'
      try:
        commands = split_commands(line)
      except ValueError as e:
        if errors is not None and re.search(r'-m\s+(retnet_jax|experiments)\b', line):
          errors.append(f'{where}: {e}')
        continue
      for module, argv in commands:
        found.setdefault(module, []).append((where, argv))
  return found


# ------------------------------------------------------------------------------------------------
# The runner (in a process of its own).


class _Parsed(BaseException):
  """Raised where the module would start its work; BaseException so no `except Exception` eats it."""


def _stop_after_parsing():
  """Makes `absl.app.run` and `argparse.ArgumentParser.parse_args` parse, then raise _Parsed."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  original_parse_args = argparse.ArgumentParser.parse_args

  def fake_app_run(main, argv=None, flags_parser=None, **unused_kw):
    del main
    app.define_help_flags()
    rest = (flags_parser or flags.FLAGS)(argv or sys.argv)
    for name in flags.FLAGS:
      flags.FLAGS[name].value  # pylint: disable=pointless-statement  (loads lazy values)
    if rest[1:]:
      raise SystemExit(f'unexpected positional arguments {rest[1:]}')
    raise _Parsed()

  def fake_parse_args(self, args=None, namespace=None):
    original_parse_args(self, args, namespace)
    raise _Parsed()

  app.run = fake_app_run
  argparse.ArgumentParser.parse_args = fake_parse_args


def _import_dependencies(module):
  """Imports what MODULE's file imports at its top level (not MODULE itself, whose `__main__` code
  each forked child runs once), so that the children start warm."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(module)
  path = spec.origin
  if spec.submodule_search_locations:  # A package runs its __main__.py.
    path = os.path.join(spec.submodule_search_locations[0], '__main__.py')
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    for name in names:
      try:
        importlib.import_module(name)
      except Exception:  # pylint: disable=broad-except  (not a module, or fails: the child reports)
        pass


def _check_in_child(module, argv):
  """Runs MODULE as __main__ with argv in a forked child, up to its parsing; None or the error."""
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:  # The child: parse, report on the pipe, exit without cleanup.
    os.close(read_end)
    import io  # pylint: disable=g-import-not-at-top
    sys.stderr = sys.stdout = io.StringIO()
    sys.argv = [module] + list(argv)
    try:
      runpy.run_module(module, run_name='__main__', alter_sys=True)
      problem = 'the module ran to its end without parsing any arguments'
    except _Parsed:
      problem = None
    except SystemExit as e:
      lines = [l for l in sys.stderr.getvalue().splitlines() if l.strip()]
      problem = (lines[-1].strip() if lines else '') + (f' ({e.code})' if e.code else '')
    except BaseException as e:  # pylint: disable=broad-except
      problem = f'{type(e).__name__}: {e}'.splitlines()[0]
    os.write(write_end, json.dumps(problem).encode())
    os._exit(0)  # pylint: disable=protected-access
  os.close(write_end)
  chunks = []
  while chunk := os.read(read_end, 65536):
    chunks.append(chunk)
  os.close(read_end)
  os.waitpid(pid, 0)
  return json.loads(b''.join(chunks) or b'"the parsing process died"')


def run_checks(commands):
  """{module: [argv]} -> {module: [None or the error]}."""
  os.chdir(ROOT)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  _stop_after_parsing()
  for module in commands:
    _import_dependencies(module)
  return {m: [_check_in_child(m, argv) for argv in argvs] for m, argvs in commands.items()}


# ------------------------------------------------------------------------------------------------
# The tests.

# Commands that must fail, run beside the documented ones: the check is only as good as these.
# (module, argv, a word the error must name)
NEGATIVE = [
    ('retnet_jax.main', ['--config=configs/retnet_tiny.py', '--workdir=DIR', '--max_new_token=5'],
     'max_new_token'),
    ('retnet_jax.main', ['--config=configs/retnet_tiny.py', '--workdir=DIR',
                         '--config.model.num_layer=2'], 'num_layer'),
    ('retnet_jax.main', ['--config=configs/retnet_tiny.py', '--workdir=DIR',
                         '--config.total_steps=many'], 'many'),
    ('retnet_jax.main', ['--config=configs/no_such_config.py', '--workdir=DIR'], 'no_such_config'),
    ('retnet_jax.main', ['--config=configs/retnet_tiny.py'], 'workdir'),
    ('retnet_jax.convert', ['--from=fla', '--input=a', '--output=b', '--bogus'], 'bogus'),
    ('experiments.scaling', ['--quick', '--sizez=1'], 'sizez'),
]


@pytest.fixture(scope='module')
def results():
  """{module: [(where, argv, problem)]} for every documented module, negative controls included."""
  if not hasattr(os, 'fork'):
    pytest.skip('the flag check forks a process per command')
  commands = documented_commands()
  for i, (module, argv, _) in enumerate(NEGATIVE):
    commands.setdefault(module, []).append((f'<negative control {i}>', argv))
  proc = subprocess.run([sys.executable, '-m', 'tests.docs_test'], cwd=ROOT, capture_output=True,
                        input=json.dumps({m: [a for _, a in c] for m, c in commands.items()}),
                        text=True, timeout=600, check=False,
                        env={**os.environ, 'PYTHONPATH': ROOT + os.pathsep +
                             os.environ.get('PYTHONPATH', '')})
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0 and lines, f'the flag check failed to run: {proc.stderr[-3000:]}'
  problems = json.loads(lines[-1])
  return {m: [(w, a, p) for (w, a), p in zip(c, problems[m])] for m, c in commands.items()}


def test_extractor_handles_continuations_variables_chains_and_bad_quotes(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('text `python -m retnet_jax.main --not=checked`\n'
                  '```bash\n'
                  'pip install -e . && python -m retnet_jax.main --config=c.py \\\n'
                  "    --workdir=$DIR --prompt=$'a\\n' # a comment\n"
                  'XLA_FLAGS=--x=1 python -m experiments.scaling --quick; python -m pytest -q\n'
                  'timeout 9 python3 -m experiments.mqar --quick | tee log\n'
                  "python -m experiments.table6 --prompt='unbalanced\n"
                  '```\n')
  found = documented_commands([str(page)])
  assert [(w.split(':')[-1], a) for w, a in found['retnet_jax.main']] == [
      ('3', ['--config=c.py', '--workdir=$DIR', '--prompt=a\\n'])]
  assert [a for _, a in found['experiments.scaling']] == [['--quick']]
  assert [a for _, a in found['experiments.mqar']] == [['--quick']]
  assert set(found) == {'retnet_jax.main', 'experiments.scaling', 'experiments.mqar'}
  errors = []
  documented_commands([str(page)], errors)
  assert len(errors) == 1 and errors[0].endswith(':7: No closing quotation'), errors


def test_docs_show_commands_that_split():
  errors = []
  commands = documented_commands(errors=errors)
  assert 'retnet_jax.main' in commands, 'README.md and docs/ show no `python -m retnet_jax.main`'
  assert not errors, 'commands that are not valid shell words:\n' + '\n'.join(errors)


def test_negative_controls_fail(results):
  problems = {w: p for m in results.values() for w, _, p in m if w.startswith('<negative')}
  for i, (module, argv, word) in enumerate(NEGATIVE):
    problem = problems[f'<negative control {i}>']
    assert problem, f'python -m {module} {shlex.join(argv)} parsed, but must not'
    assert word in problem, f'the error for {argv} does not name {word!r}: {problem}'


@pytest.mark.parametrize('module', sorted(documented_commands()))
def test_documented_commands_parse(results, module):
  bad = [f'{where}: python -m {module} {shlex.join(argv)}\n    {problem}'
         for where, argv, problem in results[module] if problem and not where.startswith('<')]
  assert not bad, 'documented commands that do not parse:\n' + '\n'.join(bad)


def heading_anchors(text):
  """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
  anchors, inside = set(), False
  for line in text.splitlines():
    if _FENCE_RE.match(line):
      inside = not inside
    elif not inside and (m := re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)):
      slug = re.sub(r'[^\w\- ]', '', m.group(1).strip().lower()).replace(' ', '-')
      anchor, n = slug, 0
      while anchor in anchors:
        n += 1
        anchor = f'{slug}-{n}'
      anchors.add(anchor)
  return anchors


# Pages the README's index names before they are written (listed under its marked comment).
_PENDING_MARK = '<!-- Pages written separately'


def test_links_resolve_and_every_page_is_indexed():
  """Every relative link of README.md and docs/*.md reaches a file (and its heading, given one),
  except the pages the README lists as written separately; the README links every docs page."""
  bad, pending = [], set()
  readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  if _PENDING_MARK in readme:
    pending = {os.path.join(ROOT, os.path.normpath(t))
               for t in re.findall(r'\]\(([^)#]+)\)', readme.split(_PENDING_MARK, 1)[1])}
  for path in doc_files():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    for number, line in enumerate(text.splitlines(), 1):
      for target in re.findall(r'\]\(([^)\s]+)\)', line):
        if re.match(r'^[a-z]+:', target):
          continue
        file_part, _, anchor = target.partition('#')
        where = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(where):
          if where in pending:
            continue
          bad.append(f'{os.path.relpath(path, ROOT)}:{number}: {target} (no such file)')
        elif anchor and where.endswith('.md'):
          with open(where, encoding='utf-8') as f:
            if anchor not in heading_anchors(f.read()):
              bad.append(f'{os.path.relpath(path, ROOT)}:{number}: {target} (no such heading)')
  linked = set(re.findall(r'\]\((docs/[^)#]+\.md)', readme))
  for page in glob.glob(os.path.join(ROOT, 'docs', '*.md')):
    if os.path.relpath(page, ROOT) not in linked:
      bad.append(f'README.md does not link {os.path.relpath(page, ROOT)}')
  assert not bad, 'broken links:\n' + '\n'.join(bad)


if __name__ == '__main__':
  print(json.dumps(run_checks(json.load(sys.stdin))))
