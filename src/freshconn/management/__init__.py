"""Management commands of freshconn."""
