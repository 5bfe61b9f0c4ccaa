"""freshconn's benchmark: one primary-key SELECT per message, per driver and connection policy.

Run it with ``scripts/bench`` or ``python -m benchmarks`` (see docs/benchmarks.md). The parent
process starts throwaway servers and runs each driver in its own child process
(``benchmarks.child``), because a process can load only one MySQL and one PostgreSQL driver.
Importing this package must not import Django: the child picks its driver before Django loads.
"""
