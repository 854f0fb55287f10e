"""Load tests: realistic HTTP traffic against a server on 127.0.0.1 (see README.md)."""
