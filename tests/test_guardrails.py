"The guardrails' personal-data recognizers in a fresh process, as the gateway's first requests meet them."
import sys

from conftest import run

# the gateway builds the analyzer in a thread at start; the first requests redact meanwhile (spaCy imported twice at once fails)
FIRST_REQUESTS = """
import threading, traceback
from llmops_tpl.guardrails import personal_data_analyzer, redact
errors, redacted = [], []
def request():
    try: redacted.append(redact('mail me at a.b@example.org')[0])
    except Exception: errors.append(traceback.format_exc())
threads = [threading.Thread(target=personal_data_analyzer)] + [threading.Thread(target=request) for _ in range(3)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors[0] if errors else redacted)
"""


def test_the_first_requests_redact_while_the_analyzer_is_being_built():
    out = run([sys.executable, '-c', FIRST_REQUESTS], '.', timeout=300).stdout.strip()
    assert out == str(['mail me at [email]'] * 3), out
