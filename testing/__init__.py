"""Tooling shared by the tests, benchmarks and load tests: server subprocesses on 127.0.0.1 (``process``)."""
