"""``python benchmarks/quality [run|cell] ...``: the quality study (see ``study.py`` and the benchmarks page)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the study's modules, then the benchmarks' ``common``

import study  # noqa: E402

raise SystemExit(study.main())
