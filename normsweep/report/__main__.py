"""``python -m normsweep.report`` (= ``normsweep-report``): see :mod:`normsweep.report.tables`."""

from normsweep.report.tables import main

if __name__ == "__main__":
    raise SystemExit(main())
