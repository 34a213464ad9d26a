"The project's own consistency: the package is the notebooks' export, the install lists agree, fixtures match the code."
import ast
import filecmp
import json
import re
import shutil
from configparser import ConfigParser

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


def _settings_requirements():
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    return set(cfg['DEFAULT']['requirements'].split() + cfg['DEFAULT']['dev_requirements'].split())


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
    long_bodies, long_docs = [], []
    for path in sorted((ROOT/'llmops_tpl').glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None
            if doc and (len(doc) > 100 or '\n' in doc): long_docs.append(f"{path.name}:{node.name}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if doc is not None else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > 40: long_bodies.append(f"{path.name}:{node.name}")
    assert not long_bodies, f"functions over 40 lines: {long_bodies}"
    assert not long_docs, f"docstrings over one line of 100 characters: {long_docs}"
