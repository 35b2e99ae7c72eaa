"""`python -m sdfast.cli`, as `python -m sdfast`."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
