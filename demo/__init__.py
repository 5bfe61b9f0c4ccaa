"""freshconn's demo: a Django Kafka consumer against a MariaDB that drops idle sessions.

Run it with ``scripts/demo`` (installs what it needs first) or ``.venv/bin/python -m demo``.
The Django project lives here too: ``demo/settings.py``, the ``demo.orders`` app, ``demo/manage.py``.
"""
