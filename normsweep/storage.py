"""``python -m normsweep.storage repair FILE``: the command's name; the code is :mod:`normsweep.search.storage`."""

from normsweep.search.storage import main

if __name__ == "__main__":
    raise SystemExit(main())
