"""Schemathesis over every operation the other shards do not name (groups, /v1, GraphQL, seed 002's API,
/usage, health...): one shard of the run (turbo_site/tests/schemathesis_run.py)."""

from turbo_site.tests.schemathesis_run import MARKS, run_shard

pytestmark = MARKS


def test_every_other_operation_answers_as_the_schema_says(turbo_server, signup, client, upstream, tmp_path):
    run_shard("the_rest", server_url=turbo_server.url, signup=signup, client=client, tmp_path=tmp_path)
