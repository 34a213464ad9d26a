"The project's own consistency: the package is the notebooks' export, the install lists agree, fixtures match the code."
import ast
import filecmp
import json
import re
import shutil
import statistics
import sys
from configparser import ConfigParser
from importlib.metadata import packages_distributions

import pandas as pd
import yaml
from transformers import AutoTokenizer

from conftest import BIN, ROOT, run
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.models import resolve_model


def test_nbdev_export_leaves_no_diff(tmp_path):
    for name in ['nbs', 'llmops_tpl']: shutil.copytree(ROOT/name, tmp_path/name)
    for name in ['settings.ini', 'dvc.yaml', 'params.yaml']: shutil.copy(ROOT/name, tmp_path/name)
    run([BIN/'nbdev_export'], tmp_path)
    cmp = filecmp.dircmp(ROOT/'llmops_tpl', tmp_path/'llmops_tpl', ignore=['__pycache__'])
    assert not (cmp.diff_files or cmp.left_only or cmp.right_only), (cmp.diff_files, cmp.left_only, cmp.right_only)


def _settings_requirements(keys=('requirements', 'dev_requirements')):
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    return {r for key in keys for r in cfg['DEFAULT'][key].split()}


def test_environment_yml_matches_settings_ini():
    env = yaml.safe_load((ROOT/'environment.yml').read_text())
    pip = next(d['pip'] for d in env['dependencies'] if isinstance(d, dict))
    assert set(pip) - {'-e .'} == _settings_requirements()
    assert 'python=3.11' in env['dependencies']


def test_fixture_chunks_match_the_fixture_corpus():
    "tests/fixtures/chunks.parquet (the index notebook's smoke input) is what `prepare` makes of tests/fixtures/corpus."
    tok = AutoTokenizer.from_pretrained(resolve_model('sentence-transformers/all-MiniLM-L6-v2'))
    chunks, _ = prepare_corpus(ROOT/'tests'/'fixtures'/'corpus', tok)
    pd.testing.assert_frame_equal(chunks, pd.read_parquet(ROOT/'tests'/'fixtures'/'chunks.parquet'))


def _package_imports(tree):
    "Names of the llmops_tpl modules `tree` imports anywhere (function bodies too); '' stands for the package's __init__."
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split('.')[1] if '.' in a.name else '' for a in node.names if a.name.split('.')[0] == 'llmops_tpl')
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or '').split('.')[0] == 'llmops_tpl'):
            sub = (node.module or '').split('.')[1 if not node.level else 0:]
            yield from [sub[0]] if sub else (a.name for a in node.names)


def _module_closure(tree):
    "The llmops_tpl/*.py files `tree` imports, directly or through the package's own imports."
    todo, seen = [tree], set()
    while todo:
        for name in _package_imports(todo.pop()):
            path = f'llmops_tpl/{name}.py' if name and (ROOT/'llmops_tpl'/f'{name}.py').exists() else 'llmops_tpl/__init__.py'
            if path not in seen: seen.add(path); todo.append(ast.parse((ROOT/path).read_text()))
    return seen - {'llmops_tpl/__init__.py', 'llmops_tpl/_modidx.py'}  # __init__ only sets __version__


def test_dvc_stage_deps_list_exactly_the_modules_their_notebooks_import():
    wrong = []
    for name, stage in yaml.safe_load((ROOT/'dvc.yaml').read_text())['stages'].items():
        nb = re.search(r'nbs/stages/\S+\.ipynb', stage['cmd'])[0]
        cells = [c['source'] for c in json.loads((ROOT/nb).read_text())['cells'] if c['cell_type'] == 'code']
        code = '\n'.join(l for c in cells for l in ''.join(c).splitlines() if not l.lstrip().startswith(('%', '!')))
        want, have = _module_closure(ast.parse(code)), {d for d in stage['deps'] if d.startswith('llmops_tpl/')}
        if nb not in stage['deps'] or have != want:
            wrong.append(f"{name}: {'' if nb in stage['deps'] else nb + ' not in deps; '}missing {sorted(want - have)}, extra {sorted(have - want)}")
    assert not wrong, '\n'.join(wrong)


def test_package_functions_are_short_and_docstrings_one_short_line():
    bodies, long_docs = {}, []
    for path in sorted((ROOT/'llmops_tpl').glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None
            if doc and (len(doc) > 100 or '\n' in doc): long_docs.append(f"{path.name}:{node.name}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if doc is not None else node.body
                bodies[f"{path.name}:{node.lineno}:{node.name}"] = body[-1].end_lineno - body[0].lineno + 1 if body else 0
    assert not [f for f, n in bodies.items() if n > 40], f"functions over 40 lines: {[f for f, n in bodies.items() if n > 40]}"
    p90 = statistics.quantiles(bodies.values(), n=10)[8]
    assert p90 <= 12, f"p90 of function bodies is {p90} lines; the longest: {sorted(bodies.items(), key=lambda x: -x[1])[:10]}"
    assert not long_docs, f"docstrings over one line of 100 characters: {long_docs}"


def test_code_lines_are_at_most_120_characters():
    "The package (but nbdev's generated `__all__`) and the notebooks' code cells."
    long = [f"{p.name}:{i}" for p in sorted((ROOT/'llmops_tpl').glob('*.py')) if p.name != '_modidx.py'
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120 and not line.startswith('__all__')]
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')):
        cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        long += [f"{nb.name}:{c['id']}" for c in cells for line in ''.join(c['source']).splitlines() if len(line) > 120]
    assert not long, f"lines over 120 characters: {long}"


def test_every_package_the_package_imports_is_declared():
    "Each third-party module that `llmops_tpl` imports (at the top or in a function) belongs to a requirement in settings.ini."
    imported = set()
    for path in (ROOT/'llmops_tpl').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import): imported |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0: imported.add(node.module.split('.')[0])
    declared = {re.split(r'[=<>\[]', r)[0].lower().replace('_', '-') for r in _settings_requirements(['requirements'])}
    dists = packages_distributions()
    undeclared = {m: dists.get(m) for m in imported - set(sys.stdlib_module_names) - {'llmops_tpl'}
                  if not {d.lower().replace('_', '-') for d in dists.get(m, [])} & declared}
    assert not undeclared, f"imported but not declared in settings.ini (module: its distributions): {undeclared}"
