"""Tooling shared by the tests, benchmarks and load tests: server subprocesses on 127.0.0.1 (``process``),
and the command line and BENCHMARKS.md tables of benchmarks and load tests (``report``)."""
