"""Print killed / survived per module from mutmut's results in mutants/ (see scripts/mutation.sh).

Mutants that change only the wording of a message (a string literal, nothing else on the line) are counted apart as
"text": they cannot make a resume do anything other than what it did, and the messages a user relies on (a
refusal's fix, for instance) are pinned by tests of their own. The score is killed / (killed + survived + no tests)
over the other mutants: a mutant that no selected test reaches counts against it. ``--list`` prints each surviving
and unreached non-text mutant's name; ``--only GLOB`` counts only the mutants whose names match (``'*7'``: the
systematic one-in-ten sample ``scripts/mutation.sh --sample`` runs).
"""

from __future__ import annotations

import fnmatch
import io
import json
import sys
import tokenize
from collections import Counter
from pathlib import Path

from mutmut.__main__ import find_mutant, get_diff_for_mutant, status_by_exit_code


def _code_only(line: str) -> list[tuple[int, str]] | None:
    """The line's tokens with every string literal replaced by one placeholder (None: not a whole line of code)."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    out = []
    for t in toks:
        if t.type in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.COMMENT):
            continue
        out.append((tokenize.STRING, "") if t.type in (tokenize.STRING, getattr(tokenize, "FSTRING_START", -1))
                   else (t.type, t.string))
    return out


def text_only(name: str) -> bool:
    """Whether mutant ``name`` changes string literals only."""
    diff = get_diff_for_mutant(name, path=find_mutant(name).path)
    old = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    if len(old) != len(new) or not old:
        return False
    for a, b in zip(old, new, strict=True):
        ca, cb = _code_only(a), _code_only(b)
        if ca is None or cb is None or ca != cb:
            return False
    return True


def main(argv: list[str]) -> int:
    listing = "--list" in argv
    only = argv[argv.index("--only") + 1] if "--only" in argv else "*"
    totals: Counter[str] = Counter()
    rows = []
    left: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        c: Counter[str] = Counter()
        for name, code in codes.items():
            if code is None or not fnmatch.fnmatch(name, only):
                continue  # not run (outside the globs of this run), or not asked for
            status = status_by_exit_code.get(code, str(code))
            if status in ("survived", "no tests", "killed") and text_only(name):
                status = "text"
            c[status] += 1
            if status in ("survived", "no tests"):
                left.append(f"{status:9} {name}")
        if c:
            totals.update(c)
            rows.append((str(meta.relative_to("mutants"))[:-5], c))
    print(f"{'module':<36} {'killed':>7} {'survived':>9} {'no tests':>9} {'text':>5} {'other':>6}  score")
    for name, c in [*rows, ("TOTAL", totals)]:
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "no tests", "text"))
        applicable = c["killed"] + c["survived"] + c["no tests"]
        score = f"{100 * c['killed'] / applicable:.1f}%" if applicable else "-"
        print(f"{name:<36} {c['killed']:>7} {c['survived']:>9} {c['no tests']:>9} {c['text']:>5} {other:>6}  {score}")
    if listing:
        print("\n".join(left))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
