"""Schemathesis over POST /chat/update: one shard of the run (turbo_site/tests/schemathesis_run.py)."""

from turbo_site.tests.schemathesis_run import MARKS, run_shard

pytestmark = MARKS


def test_chat_update_answers_as_the_schema_says(turbo_server, signup, client, upstream, tmp_path):
    run_shard("chat_update", server_url=turbo_server.url, signup=signup, client=client, tmp_path=tmp_path)
