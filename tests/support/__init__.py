"""Helpers that tests import and that are not tests themselves: loopback servers, dataset
writers, fixtures built in code, and job functions that worker processes (decoding pools,
Ray actors) import by module name (`support.worker_jobs`). pytest puts tests/ on sys.path;
Ray workers get it through PYTHONPATH (tests/test_batch.py). docs/architecture.md has the
rule for what goes here, in conftest.py and in a test file."""
