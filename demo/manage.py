#!/usr/bin/env python
"""The demo project's manage.py (``python demo/manage.py consume_orders --help``)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    # Import the project as the ``demo`` package from the repository root, never as loose modules
    # from this folder; src/ makes freshconn importable even without the editable install.
    sys.path[0] = str(ROOT)
    sys.path.insert(1, str(ROOT / "src"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
