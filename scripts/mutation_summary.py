"""Print killed / survived per module from mutmut's results in mutants/ (see scripts/mutation.sh)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.__main__ import status_by_exit_code

totals: Counter[str] = Counter()
rows = []
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
    if not codes:
        continue
    c = Counter(status_by_exit_code.get(v, str(v)) for v in codes.values())
    totals.update(c)
    rows.append((str(meta.relative_to("mutants"))[:-5], c))
print(f"{'module':<32} {'killed':>7} {'survived':>9} {'other':>6}  score")
for name, c in [*rows, ("TOTAL", totals)]:
    other = sum(v for k, v in c.items() if k not in ("killed", "survived"))
    applicable = c["killed"] + c["survived"]
    score = f"{100 * c['killed'] / applicable:.1f}%" if applicable else "-"
    print(f"{name:<32} {c['killed']:>7} {c['survived']:>9} {other:>6}  {score}")
sys.exit(0)
