"""The fault suite: the real bot as a subprocess, killed (-9) or stopped (SIGTERM) at chosen moments
while the fake Slack / Discord in the test process misbehave on purpose (see harness.py).

    pytest tests/faults                          # the chosen matrix (about 30 cases)
    pytest -m "not faults"                       # everything else
    BOT_TEST_FAULTS_FULL=1 pytest tests/faults   # every scenario on every transport and database
"""
