"""The chaos soak: a Django worker drains a real Redis queue while real faults of six kinds strike it.

``scripts/soak`` (``python -m soak``) runs it; docs/reliability.md explains what it does and shows a
full run. Not part of the freshconn package.
"""
