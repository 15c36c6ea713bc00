"""``python -m gla_export``: the ``gla-export`` command, for environments without the script."""

from .cli import main

if __name__ == "__main__":
    main()
