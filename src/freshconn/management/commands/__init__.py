"""The ``freshconn`` management command."""
