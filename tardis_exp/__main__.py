"""``python -m tardis_exp``: the same entry point as the ``tardis-exp`` command."""

from .cli import main

if __name__ == "__main__":
    main()
