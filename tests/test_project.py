"The project's own consistency: the package is the notebooks' export, the install lists agree, fixtures match the code."
import filecmp
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
