"""``python -m normsweep.studies``: the command's name; the code is :mod:`normsweep.search.studies`."""

from normsweep.search.studies import main

if __name__ == "__main__":
    raise SystemExit(main())
