"The app and feedback as data: the store under concurrent writers (SQLite and a real PostgreSQL), the app in a real browser."
import json
import os
import re
import subprocess
import sys
import time

import mlflow
import pytest
from gradio_client import Client
from playwright.sync_api import expect

from conftest import BIN, copy_database, copy_project, read_json, run, start, stop
from llmops_tpl.examples import free_port
from llmops_tpl.feedback import FEEDBACK, export_reviewed, open_store, read_table, review

# one writer process: says it is ready, waits for the word to go, then appends its events as fast as it can
WRITER = '''
import sys
from llmops_tpl.feedback import add_feedback, open_store
url, client, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(url)
print('ready', flush=True)
sys.stdin.readline()
for i in range(events):
    add_feedback(store, f"question {i} from {client}", "an answer", "down" if i % 5 == 0 else "up", trace_id=f"{client}-{i}", user=client)
'''


def write_concurrently(url, clients=20, events=50):
    "`clients` processes append `events` rows each, all at once; returns the seconds it took."
    open_store(url)  # tables created once, before the writers race
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, url, f"client{c}", str(events)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in range(clients)]
    assert [p.stdout.readline() for p in procs] == ['ready\n'] * clients
    start = time.time()
    for p in procs: p.stdin.write('go\n'); p.stdin.flush()
    errors = [p.stderr.read() for p in procs if p.wait(300)]
    assert not errors, errors[0][-2000:]
    return time.time() - start


def check_nothing_lost(url, clients=20, events=50):
    rows = read_table(open_store(url))
    assert len(rows) == clients * events
    assert rows.id.is_unique and rows.trace_id.is_unique
    assert rows.groupby('user').size().eq(events).all()


def test_sqlite_store_loses_nothing_under_20_concurrent_writers(tmp_path):
    url = f"sqlite:///{tmp_path/'feedback.db'}"
    seconds = write_concurrently(url)
    check_nothing_lost(url)
    print(f"SQLite (WAL): 20 processes x 50 events in {seconds:.1f} s")


def test_postgresql_store_loses_nothing_and_exports_reviewed_rows(postgres_url):
    seconds = write_concurrently(postgres_url)
    check_nothing_lost(postgres_url)
    print(f"PostgreSQL: 20 processes x 50 events in {seconds:.1f} s")
    store = open_store(postgres_url)
    with store.connect() as c: assert c.exec_driver_sql('select version()').scalar().startswith('PostgreSQL')
    first = int(read_table(store, where=FEEDBACK.c.rating == 'down').id.iloc[0])
    review(store, first, 'accepted', 'rita', 'real failure')
    with pytest.raises(ValueError, match='already accepted by rita'): review(store, first, 'rejected', 'sam')
    assert export_reviewed(store, '/dev/null') == 1


def test_app_in_a_real_browser(small_project, approved, browser, tmp_path):
    "Ask, see sources, thumbs down with a correction (HTML inside), then the feedback row and the trace's assessments exist; bad input is refused."
    port, store_url = free_port(), f"sqlite:///{small_project/'feedback.db'}"  # the project's own store (app.feedback_store)
    proc = start([BIN/'llmops-tpl', 'app', '--port', str(port)], small_project, f"http://127.0.0.1:{port}/", log=tmp_path/'app.log')
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label('Question', exact=True).fill('How do I write JSON to a file?')
        page.get_by_role('button', name='Ask', exact=True).click()
        page.get_by_text('Sources', exact=True).wait_for(timeout=120_000)
        assert page.get_by_text(f"Answered by llmops-tpl-rag version {approved[0]} ").is_visible()
        sources = page.get_by_text('Sources', exact=True).locator('xpath=../..').inner_text()
        assert '.md' in sources and 'score' in sources, sources

        correction = '<script>window.__xss = 1</script><b>bold</b> Use json.dump(obj, f).'
        page.get_by_label('👎 Not helpful').check()
        page.get_by_label('Reason', exact=True).fill('it did not say which function')
        page.get_by_label('Correction: the answer you expected').fill(correction)
        page.get_by_role('button', name='Send feedback').click()
        page.get_by_text(re.compile(r'feedback #\d+ recorded')).wait_for(timeout=30_000)

        row = read_table(open_store(store_url)).iloc[-1]  # the latest: other tests may have rated before
        assert (row.rating, row.reason, row.correction, row.model_version) == ('down', 'it did not say which function', correction, str(approved[0]))
        assert json.loads(row.sources) and row.trace_id

        # shown as text in the review tab, never run as HTML
        page.get_by_role('tab', name='Review').click()
        page.get_by_role('button', name='Refresh').click()
        expect(page.locator('table').first).to_contain_text(correction, timeout=30_000)
        assert page.evaluate('window.__xss') is None
        assert page.locator('b', has_text='bold').count() == 0

        # bad input: a message, not a crash
        page.get_by_role('tab', name='Chat').click()
        page.get_by_role('button', name='Ask', exact=True).click()
        page.get_by_text('Type a question first.').wait_for(timeout=30_000)
        page.get_by_label('Question', exact=True).fill('x' * 100_000)
        page.get_by_role('button', name='Ask', exact=True).click()
        page.get_by_text('the app accepts at most 4,000').wait_for(timeout=30_000)
        page.get_by_label('Question', exact=True).fill('Как записать JSON в файл? 如何写入文件？')
        page.get_by_role('button', name='Ask', exact=True).click()
        page.get_by_text('Как записать JSON в файл? 如何写入文件？').wait_for(timeout=120_000)
        expect(page.get_by_label('Question', exact=True)).to_have_value('', timeout=120_000)  # the answer is written to its end: the box clears

        # the feedback reached the trace in MLflow (the app forwards it in the background)
        mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
        for _ in range(60):
            if read_table(open_store(store_url)).forwarded_at.iloc[0]: break
            time.sleep(1)
        trace = mlflow.get_trace(row.trace_id)
        assessments = {a.name: a for a in trace.info.assessments}
        assert assessments['user_rating'].value is False and assessments['user_rating'].rationale == 'it did not say which function'
        assert assessments['expected_response'].value == correction
        assert trace.info.tags['route'] == 'selfhosted'
    except Exception:
        page.screenshot(path=str(tmp_path/'failure.png'))
        raise
    finally:
        page.close()
        stop(proc)


def test_monitor_reports_new_app_traffic_and_reruns_only_on_new_traffic(small_project, approved, tmp_path):
    "A turn and a rating through the app since the monitor last ran: counted, with latency, drift and a plot; a rerun finds nothing new."
    run([BIN/'llmops-tpl', 'monitor'], small_project)  # whatever other tests sent is read first
    before = read_json(small_project/'metrics'/'monitor.json')
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    exp = mlflow.get_experiment_by_name('llmops-tpl').experiment_id
    traced = lambda: len(mlflow.search_traces(locations=[exp], filter_string="trace.name = 'chat_turn'", return_type='list'))
    turns_before, port = traced(), free_port()
    proc = start([BIN/'llmops-tpl', 'app', '--port', str(port)], small_project, f"http://127.0.0.1:{port}/", log=tmp_path/'app.log')
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict('How do I serve static files?', 'selfhosted', [], api_name='/ask')
        client.predict('down', 'it did not name the class to mount', '', api_name='/feedback')
    finally: stop(proc)
    for _ in range(30):  # the turn's trace is written in the background: wait until it is in the store
        if traced() > turns_before: break
        time.sleep(1)
    run([BIN/'llmops-tpl', 'monitor'], small_project)
    m = read_json(small_project/'metrics'/'monitor.json')
    assert (m['new_turns'], m['turns'], m['ratings']) == (1, before['turns'] + 1, before['ratings'] + 1), (before, m)
    assert m['latency_p95_s'] >= m['latency_p50_s'] > 0 and m['errors'] == 0
    assert 0 <= m['ks_statistic'] <= 1 and m['median_shift'] is not None
    assert (small_project/'plots'/'monitor.png').stat().st_size > 10_000
    assert 'it did not name the class to mount' in (small_project/'reports'/'monitor.ipynb').read_text()  # the failing questions' reasons
    again = run([BIN/'llmops-tpl', 'monitor'], small_project)
    assert "Stage 'monitor' didn't change" in again.stdout + again.stderr or 'up to date' in again.stdout + again.stderr


def test_the_app_keeps_answering_while_mlflow_is_down_and_forwards_the_feedback_later(small_project, approved, tmp_path):
    "A real `mlflow server` (on a copy of the project's database) stops after a turn is traced: the rating waits in the store, then reaches the trace."
    from gradio_client import Client
    copy_database(small_project/'mlflow.db', tmp_path/'server.db')
    port, app_port = free_port(), free_port()
    uri = f"http://127.0.0.1:{port}"
    server_args = [BIN/'mlflow', 'server', '--backend-store-uri', f"sqlite:///{tmp_path/'server.db'}", '--artifacts-destination',
                   str(tmp_path/'artifacts'), '--host', '127.0.0.1', '--port', str(port), '--workers', '1']
    server_env = {'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}
    server = start(server_args, tmp_path, f"{uri}/health", env=server_env, log=tmp_path/'server.log')
    store_url = f"sqlite:///{tmp_path/'feedback.db'}"
    app = start([BIN/'llmops-tpl', 'app', '--port', str(app_port), '--forward-seconds', '2'], small_project, f"http://127.0.0.1:{app_port}/",
                env={'MLFLOW_TRACKING_URI': uri, 'LLMOPS_FEEDBACK_STORE': store_url, 'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0',
                     'MLFLOW_HTTP_REQUEST_TIMEOUT': '5'}, log=tmp_path/'app.log')
    try:
        mlflow.set_tracking_uri(uri)
        exp = mlflow.get_experiment_by_name('llmops-tpl').experiment_id
        def turns():
            try: return {t.info.trace_id for t in mlflow.search_traces(locations=[exp], filter_string="trace.name = 'chat_turn'", return_type='list')}
            except mlflow.exceptions.MlflowException as e:  # say what the server said (CI once saw only its 500s)
                raise AssertionError(f"{e}\n{(tmp_path/'server.log').read_text()[-6000:]}") from e
        before = turns()  # the copied database holds the browser test's turns
        client = Client(f"http://127.0.0.1:{app_port}/", verbose=False)
        client.predict('How do I parse command-line arguments?', 'selfhosted', [], api_name='/ask')
        for _ in range(60):  # exported in the background
            if turns() - before: break
            time.sleep(1)
        assert turns() - before, 'the turn reached the server'
        stop(server)

        assert client.predict('down', 'wrong module', 'Use argparse.ArgumentParser.', api_name='/feedback')[0].startswith('Thank you')
        history, *_ = client.predict('How do I open an SQLite database?', 'selfhosted', [], api_name='/ask')  # still answers
        assert history[-1]['content'][0]['text'].strip()
        store = open_store(store_url)
        for _ in range(30):
            row = read_table(store).iloc[0]
            if row.forward_error: break
            time.sleep(1)
        assert row.forwarded_at is None and row.forward_error, row.to_dict()

        server = start(server_args, tmp_path, f"{uri}/health", env=server_env, log=tmp_path/'server.log')
        for _ in range(60):
            row = read_table(store).iloc[0]
            if row.forwarded_at: break
            time.sleep(1)
        assert row.forwarded_at, row.to_dict()
        assessments = {a.name: a for a in mlflow.get_trace(row.trace_id).info.assessments}
        assert assessments['user_rating'].value is False and assessments['expected_response'].value == 'Use argparse.ArgumentParser.'
    finally:
        stop(app)
        stop(server)


def test_only_named_reviewers_review_and_repeated_failed_logins_are_refused(small_project, approved, tmp_path):
    "With a login, a user not in LLMOPS_APP_REVIEWERS can neither approve nor review, through the UI's API; a reviewer can; five failed logins lock a user out."
    import httpx
    from llmops_tpl.feedback import add_feedback
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {'LLMOPS_APP_AUTH': 'ana:pw-ana,ben:pw-ben', 'LLMOPS_APP_REVIEWERS': 'ana'}
    proc = start([BIN/'llmops-tpl', 'app', '--port', str(port)], small_project, url, env=env, log=tmp_path/'app.log')
    try:
        store = open_store(f"sqlite:///{small_project/'feedback.db'}")
        fid = add_feedback(store, 'Is this mine to review?', 'No.', 'down', user='ben')
        ben = Client(url, auth=('ben', 'pw-ben'), verbose=False)
        with pytest.raises(Exception, match='may not vote, approve or review'):
            ben.predict('ben', 'I approve myself', 'an override', api_name='/approve')
        with pytest.raises(Exception, match='may not vote, approve or review'):
            ben.predict(fid, 'ana', 'typed as someone else', api_name='/accept')
        assert read_table(store, where=FEEDBACK.c.id == fid).review.iloc[0] is None
        Client(url, auth=('ana', 'pw-ana'), verbose=False).predict(fid, 'typed', 'not a real failure', api_name='/reject')
        row = read_table(store, where=FEEDBACK.c.id == fid).iloc[0]
        assert (row.review, row.reviewer) == ('rejected', 'ana')
        login = lambda user, password: httpx.post(url + 'login', data={'username': user, 'password': password}).status_code
        assert [login('ben', 'guess') for _ in range(5)] == [400] * 5
        assert login('ben', 'pw-ben') == 400, 'locked out, right password or not'
        assert login('ana', 'pw-ana') == 200
    finally: stop(proc)


def test_a_burst_of_thumbs_down_fires_one_alert_at_the_webhook_within_seconds(small_project, approved, tmp_path):
    "`llmops-tpl monitor --follow` on a copy of the project: three answers rated down through the app's API post one alert, once."
    import threading
    import yaml
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from llmops_tpl.alerts import read_alerts
    ONLINE = {'online_best_retrieval_score', 'online_answer_words', 'online_cites_source'}
    received = []
    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((time.monotonic(), json.loads(self.rfile.read(int(self.headers['Content-Length'])))))
            self.send_response(200); self.end_headers()
        def log_message(self, *args): pass
    hook = HTTPServer(('127.0.0.1', free_port()), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    project = copy_project(small_project, tmp_path/'project')  # its own params, feedback store and traces
    params = yaml.safe_load((project/'params.yaml').read_text())
    params['monitor'].update(follow_seconds=1, alert_min_count=3, online_eval_share=1.0,
                             alerts={'burst': {'metric': 'satisfaction', 'window': 3, 'below': 0.5}})
    (project/'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    store_url, port = f"sqlite:///{tmp_path/'feedback.db'}", free_port()  # a store of its own: only this test's ratings
    env = {'LLMOPS_ALERT_WEBHOOK': f"http://127.0.0.1:{hook.server_port}/alerts", 'LLMOPS_FEEDBACK_STORE': store_url}
    follower = subprocess.Popen([BIN/'llmops-tpl', 'monitor', '--follow'], cwd=project, env={**os.environ, **env},
                                stdout=open(tmp_path/'follow.log', 'w'), stderr=subprocess.STDOUT)
    app = start([BIN/'llmops-tpl', 'app', '--port', str(port)], project, f"http://127.0.0.1:{port}/", env=env, log=tmp_path/'app.log')
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for question in ('How do I serve static files?', 'How do I mount a sub-application?', 'How do I test my app?'):
            client.predict(question, 'selfhosted', [], api_name='/ask')
            assert client.predict('down', 'not what I asked', '', api_name='/feedback')[0].startswith('Thank you')
        rated = time.monotonic()
        mlflow.set_tracking_uri(f"sqlite:///{project/'mlflow.db'}")
        for _ in range(60):
            if received: break
            time.sleep(0.5)
        assert received, (tmp_path/'follow.log').read_text()[-3000:]
        print(f"alert latency from the last thumbs-down to the webhook: {received[0][0] - rated:.1f} s")
        for _ in range(20):  # the Monitor tab judges the same rules, and scores each turn once its trace is in
            head, versions, online, checks, rated_down, shadow, usage = client.predict(api_name='/monitor')
            if sum(row[1] for row in online['data']) >= 3: break
            time.sleep(1)
        assert re.match(r'\d+ turns and 3 ratings read\. Alerts open: \*\*burst\*\*: satisfaction 0\.0 \(below 0\.5\)', head), head
        assert checks['data'] == [['burst', 'satisfaction', 3, 'below 0.5', 0.0, 3, True]], checks
        assert 'not what I asked' in str(rated_down) and '3' in str(versions['data'])
        assert sum(row[1] for row in online['data']) >= 3, online  # every turn scored as it arrived (share 1.0)
        scored = [t for t in mlflow.search_traces(locations=[mlflow.get_experiment_by_name('llmops-tpl').experiment_id],
                                                  filter_string="trace.name = 'chat_turn'", return_type='list')
                  if any(a.name == 'online_cites_source' and a.source.source_type == 'CODE' for a in t.info.assessments)]
        assert len(scored) >= 3 and all(len({a.name for a in t.info.assessments} & ONLINE) >= 2 for t in scored)
        similarity = [[a.value for a in t.info.assessments if a.name == 'online_passage_similarity'] for t in scored]
        assert all(v and all(0 < x <= 1 for x in v) for v in similarity), similarity  # by the index's embedder, in both followers
        time.sleep(4)  # four more polls of the follower, and the app's: the open alert is not posted again
        assert [body['rule'] for _, body in received] == ['burst'] and received[0][1]['value'] == 0.0, received
        alert = read_alerts(open_store(store_url)).iloc[0]
        assert alert.delivered_at and alert.resolved_at is None and alert['count'] == 3
        for _ in range(20):  # the newest turn's trace is tagged (the trace itself is written in the background)
            tags = mlflow.get_trace(alert.trace_id).info.tags if alert.trace_id else {}
            if 'alert.burst' in tags: break
            time.sleep(0.5)
        assert tags.get('alert.burst') == '0.0', tags
        assert 'ALERT burst: satisfaction 0.0 (below 0.5)' in (tmp_path/'follow.log').read_text()
    finally:
        stop(app)
        stop(follower)
        hook.shutdown()


def test_challenger_traffic_shadow_pairs_both_answers_and_split_sends_a_user_to_the_challenger(small_project, approved, tmp_path):
    "`app.challenger_traffic` through the app's API: in shadow mode @challenger answers the user's question again, unseen, and the live view and the review tab pair the two; in split mode the user chats with @challenger."
    import yaml
    project = copy_project(small_project, tmp_path/'project')  # its own params and traces
    mlflow.set_tracking_uri(f"sqlite:///{project/'mlflow.db'}")
    challenger = approved[0]  # the only version: @champion, and @challenger too, set here
    mlflow.MlflowClient().set_registered_model_alias('llmops-tpl-rag', 'challenger', str(challenger))
    since = int(time.time() * 1000)  # this test's turns: the copied project may hold other tests' (a chat through the gateway)
    def turns():
        return mlflow.search_traces(locations=[mlflow.get_experiment_by_name('llmops-tpl').experiment_id],
                                    filter_string=f"trace.name = 'chat_turn' AND trace.timestamp_ms > {since}",
                                    return_type='list')
    def app_in(mode):
        params = yaml.safe_load((project/'params.yaml').read_text())
        params['app']['challenger_traffic'] = {'mode': mode, 'share': 1.0}
        params['monitor']['follow_seconds'] = 1
        (project/'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
        port = free_port()
        return start([BIN/'llmops-tpl', 'app', '--port', str(port)], project, f"http://127.0.0.1:{port}/",
                     env={'LLMOPS_FEEDBACK_STORE': f"sqlite:///{tmp_path/mode}.db"}, log=tmp_path/f"{mode}.log"), port
    app, port = app_in('shadow')
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict('How do I serve static files?', 'selfhosted', [], api_name='/ask')
        for _ in range(60):  # the shadow answer is written in the background, then read by the live view
            *_, shadow, _usage = client.predict(api_name='/monitor')
            if shadow['data']: break
            time.sleep(1)
        assert [row[:3] for row in shadow['data']] == [[str(approved[0]), str(challenger), 1]], shadow
        pairs = client.predict(api_name='/shadow')
        assert pairs['data'][0][0] == 'How do I serve static files?' and pairs['data'][0][2] and pairs['data'][0][4], pairs
    finally: stop(app)
    by_traffic = {t.info.tags.get('traffic'): t.info for t in turns()}
    assert set(by_traffic) == {'champion', 'shadow'}, by_traffic.keys()
    assert by_traffic['shadow'].tags['shadow_of'] == by_traffic['champion'].trace_id
    assert by_traffic['shadow'].tags['model_version'] == str(challenger)
    app, port = app_in('split')
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for question in ('How do I mount a sub-application?', 'How do I test my app?'):
            client.predict(question, 'selfhosted', [], api_name='/ask')
    finally: stop(app)
    mlflow.flush_trace_async_logging()
    split = [t.info.tags for t in turns() if t.info.tags.get('traffic') == 'challenger']
    assert len(split) == 2 and {t['model_version'] for t in split} == {str(challenger)}, split
