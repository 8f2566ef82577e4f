"""``python -m mocohub``: the same as the ``mocohub`` command."""

from mocohub.cli import main

if __name__ == "__main__":
    main()
