"Shared fixtures: a fresh-clone style copy of the project, run through the real pipeline on a small real corpus."
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from llmops_tpl.examples import free_port
from llmops_tpl.gateway import wait_until_up

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a corpus a user brings: 14 pages of Starlette's user guide (BSD-3-Clause, its LICENSE.md inside), no API entries, 160 chunks
OWN_CORPUS, OWN_QUESTIONS = ROOT/'tests'/'fixtures'/'starlette', ROOT/'tests'/'fixtures'/'starlette-questions.jsonl'


def run(args, cwd, check=True, env=None, **kw):
    "Run a command of the installed environment in `cwd`, with its bin folder first on PATH (and `env` added); returns the completed process."
    env = {**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode: raise AssertionError(f"{args} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def read_json(path): return json.loads(Path(path).read_text())


def clone_project(dest: Path, **params) -> Path:
    "Copy what git would clone (tracked and new, not ignored), commit it in a new repository, and override `params.yaml` sections."
    files = run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], ROOT).stdout.split('\0')
    for f in filter(None, files):
        if (ROOT/f).is_file():
            (dest/f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT/f, dest/f)
    if (ROOT/'.venv-convert').is_dir(): (dest/'.venv-convert').symlink_to(ROOT/'.venv-convert')  # `make install` built it there
    p = yaml.safe_load((dest/'params.yaml').read_text())
    for section, values in params.items(): p[section].update(values)
    (dest/'params.yaml').write_text(yaml.safe_dump(p, sort_keys=False))
    for cmd in (['git', 'init', '-q'], ['git', 'add', '-A'], ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'clone']):
        run(cmd, dest)
    return dest



def copy_database(src: Path, dst: Path):
    "A consistent copy of the SQLite database `src` by SQLite's backup API: a copy of its file while a server writes to it can be torn (a 500 on every search after)."
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b: a.backup(b)


def copy_project(src: Path, dest: Path) -> Path:
    "A copy of the project folder `src` whose MLflow database is copied consistently (a session's server may be writing to it)."
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns('mlflow.db', 'mlflow.db-journal'))
    copy_database(src/'mlflow.db', dest/'mlflow.db')
    return dest

@pytest.fixture(scope='session')
def small_project(tmp_path_factory):
    "A fresh clone given its own corpus and questions as the README's \"Bring your own corpus\" says, after its main command."
    return own_corpus_project(tmp_path_factory.mktemp('project'))


# the small project's settings: few questions, two updates of fine-tuning, short answers
SMALL = dict(index={'probe_query': 'how do I serve static files'}, prepare={'max_file_mb': 0.05}, dataset={'max_examples': 60, 'eval_share': 0.2},
             finetune={'max_steps': 2, 'batch_size': 2, 'grad_accum': 1, 'save_steps': 1},
             evaluate={'limit': 6, 'gate': {'on_fail': 'warn', 'min_hit_at_k': 0.5, 'min_context_recall': 0.5,
                       'min_similarity': 1.01, 'min_similarity_margin_over_base': 0.0,
                       'min_regression_similarity': 0.5}},  # a gate that fails, and only warns
             rag={'max_new_tokens': 24}, serve={'poll_seconds': 1})


def own_corpus_project(dest: Path, **params) -> Path:
    "A fresh clone in `dest` with the `SMALL` settings (and `params`), given its own corpus and questions, after `llmops-tpl repro`."
    dest = clone_project(dest, **{**SMALL, **params})
    assert not (dest/'data'/'raw').exists()
    shutil.copytree(OWN_CORPUS, dest/'data'/'raw')
    shutil.copy(OWN_QUESTIONS, dest/'data'/'questions.jsonl')
    run([BIN/'llmops-tpl', 'repro'], dest)
    return dest


@pytest.fixture(autouse=True)
def tracking_uri_stays_in_its_test():
    "`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, which every later subprocess would inherit (a stopped server's URL, say)."
    before = os.environ.get('MLFLOW_TRACKING_URI')
    yield
    if before is None: os.environ.pop('MLFLOW_TRACKING_URI', None)
    else: os.environ['MLFLOW_TRACKING_URI'] = before


def start(args, cwd, url, env=None, timeout=180, log=None):
    "Start a server process (its output to the file `log`, or a pipe) and wait until `url` answers 200; returns the process."
    out = open(log, 'a') if log else subprocess.PIPE
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    try: wait_until_up(url, proc, timeout)
    except RuntimeError as e:
        proc.kill()
        raise AssertionError(f"{args}: {e}\n{(Path(log).read_text() if log else proc.stdout.read())[-3000:]}")
    return proc


def stop(proc):
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()


@pytest.fixture(scope='session')
def approved(small_project):
    "The registered version, after an approval was refused (its gate failed) and then given with an override."
    version = read_json(small_project/'metrics'/'register.json')['version']
    refused = run([BIN/'llmops-tpl', 'approve', '--version', str(version), '--reviewer', 'ana', '--note', 'first release'],
                  small_project, check=False)
    run([BIN/'llmops-tpl', 'approve', '--version', str(version), '--reviewer', 'ana', '--note', 'first release',
         '--override', 'demo of an override'], small_project)
    return version, refused


@pytest.fixture(scope='session')
def server(small_project, approved):
    "`llmops-tpl serve` of the approved version, on a free port."
    port = free_port()
    proc = start([BIN/'llmops-tpl', 'serve', '--port', str(port)], small_project, f"http://127.0.0.1:{port}/ready")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def need(what: str, found):
    "Skip a test whose system part (`what`) is missing here; in CI, where `make test` installs it, fail instead."
    if not found:
        if os.environ.get('CI'): pytest.fail(f"{what} is missing: `make system` installs it")
        pytest.skip(f"{what} is missing: `make system` installs it")
    return found


@pytest.fixture(scope='module')
def postgres_url():
    "A real PostgreSQL server of this machine's (Debian's `postgresql`) in a temporary folder, on a free port; yields its SQLAlchemy URL."
    initdb = need('PostgreSQL (initdb)', shutil.which('initdb') or next(iter(sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))), None))
    bindir, data = Path(initdb).parent, Path(tempfile.mkdtemp(prefix='llmops-pg-'))/'data'  # not under pytest's folder, which only root may enter
    as_user = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []  # PostgreSQL refuses to run as root
    if as_user: shutil.chown(data.parent, 'postgres')
    port = free_port()
    run([*as_user, bindir/'initdb', '-D', data, '-U', 'llmops', '--auth=trust', '-E', 'UTF8'], data.parent)
    run([*as_user, bindir/'pg_ctl', '-D', data, '-w', '-l', data.parent/'server.log', '-o', f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1", 'start'], data.parent)
    yield f"postgresql+psycopg://llmops@127.0.0.1:{port}/postgres"
    run([*as_user, bindir/'pg_ctl', '-D', data, '-m', 'fast', 'stop'], data.parent, check=False)
    shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture(scope='session')
def browser():
    "Debian's Chromium, headless, driven by Playwright (its own browser download is not used)."
    need('Chromium', Path('/usr/bin/chromium').exists())
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path='/usr/bin/chromium', args=['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                              '--disable-background-networking', '--disable-component-update', '--disable-sync'])
        yield b
        b.close()
