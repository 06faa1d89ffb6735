#!/usr/bin/env python
"""Django's command-line utility for Turbo."""

import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "turbo_site.settings")
    from importlib import import_module

    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        import_module(os.environ["DJANGO_SETTINGS_MODULE"])
    except ImproperlyConfigured as exc:
        sys.exit(f"Turbo cannot start: {exc}")

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
