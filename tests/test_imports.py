"""The import graph of the cider_jax modules has no cycle, imports inside functions included."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cider_jax')
PACKAGE = 'cider_jax'


def _modules():
  """{dotted module name: file path} of every module under cider_jax/."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len('.py')].split(os.sep)
      if rel[-1] == '__init__':
        rel = rel[:-1]
      out['.'.join(rel)] = path
  return out


def _resolve(node, module, is_package):
  """Absolute name of a relative `from` import's base module."""
  if not node.level:
    return node.module
  base = module.split('.') if is_package else module.split('.')[:-1]
  base = base[:len(base) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def _imported(tree, module, is_package, modules):
  """The cider_jax modules a module's source imports, anywhere in it (functions included).

  `from a import b` imports a.b when a.b is a module, else a (b is then a name a defines).
  Importing a.b.c also runs the packages a and a.b first; those implicit imports count too,
  except of the module's own packages, which are running already when it is imported.
  """
  explicit = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      explicit.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = _resolve(node, module, is_package)
      for alias in node.names:
        full = f'{base}.{alias.name}'
        explicit.add(full if full in modules else base)
  out = set()
  for name in explicit:
    parts = name.split('.')
    if parts[0] != PACKAGE:
      continue
    out.add(name)
    out.update('.'.join(parts[:i]) for i in range(1, len(parts))
               if not module.startswith('.'.join(parts[:i]) + '.'))
  return {m for m in out if m in modules and m != module}


def import_graph():
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    graph[module] = _imported(tree, module, path.endswith('__init__.py'), modules)
  return graph


def find_cycle(graph):
  """One cycle [m0, m1, …, m0] of a directed graph, or None."""
  state = {}  # 1: on the current path, 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_graph_sees_imports_inside_functions():
  tree = ast.parse('def f():\n  from cider_jax import train\n  import cider_jax.masks\n'
                   'def g():\n  from cider_jax.data import pipeline\n')
  modules = {'cider_jax': '', 'cider_jax.train': '', 'cider_jax.masks': '',
             'cider_jax.evaluate': '', 'cider_jax.data': '', 'cider_jax.data.pipeline': ''}
  # the package cider_jax runs before any module in it: no edge to it
  assert _imported(tree, 'cider_jax.evaluate', False, modules) == {
      'cider_jax.train', 'cider_jax.masks', 'cider_jax.data', 'cider_jax.data.pipeline'}
  # a name the package itself defines is an import of the package
  tree = ast.parse('from cider_jax import predict\n')
  assert _imported(tree, 'cider_jax.evaluate', False, modules) == {'cider_jax'}


def test_no_import_cycle():
  graph = import_graph()
  assert 'cider_jax.train' in graph and 'cider_jax.evaluate' in graph
  cycle = find_cycle(graph)
  if cycle:
    pytest.fail('import cycle among cider_jax modules: ' + ' -> '.join(cycle))


# The algorithm's modules take their implementations by injection (models/ops.py,
# backend.py): they never import the native kernels nor compare backend names.
ALGORITHM = [m for m in _modules() if m.startswith('cider_jax.models.')] + [
    'cider_jax.train_step', 'cider_jax.losses']
BACKEND_NAMES = ('native', 'xla', 'auto')


def _backend_comparisons(tree):
  """(line, source) of every comparison with a backend name's string literal."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      operands = [node.left] + list(node.comparators)
      literals = [o for o in operands if isinstance(o, ast.Constant)]
      literals += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                   for e in o.elts if isinstance(e, ast.Constant)]
      if any(c.value in BACKEND_NAMES for c in literals):
        out.append((node.lineno, ast.unparse(node)))
  return out


def test_backend_comparisons_are_found():
  tree = ast.parse("if kernel == 'native':\n  pass\nok = name in ('xla', 'other')\n"
                   "fine = mode == 'time'\n")
  assert [line for line, _ in _backend_comparisons(tree)] == [1, 3]


@pytest.mark.parametrize('module', ALGORITHM)
def test_algorithm_modules_do_not_know_the_backends(module):
  path = _modules()[module]
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  graph = import_graph()
  kernels = sorted(m for m in graph[module] if m.split('.')[:2] == ['cider_jax', 'kernels'])
  assert not kernels, f'{module} imports {kernels}'
  assert not _backend_comparisons(tree), _backend_comparisons(tree)


def test_train_step_reads_whole():
  """The MSSD iteration (train_step.train_step) stays short enough to read at once."""
  path = _modules()['cider_jax.train_step']
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'train_step')
  assert fn.end_lineno - fn.lineno + 1 <= 90
