"""``python -m vitlab.tools.recipes [EXPERIMENT ...] [--differences]``: see ``vitlab.tools.recipes``."""
from __future__ import annotations

import argparse
import sys

from vitlab.tools.recipes import __doc__ as DOC
from vitlab.tools.recipes import check, load, markdown, print_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.tools.recipes", description=DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="*", help="recipe experiments (default: all)")
    parser.add_argument("--differences", action="store_true", help="only the settings where ours differs")
    parser.add_argument("--markdown", action="store_true", help="docs/recipes.md's tables, as markdown")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return 0
    names = args.experiments or sorted(load())
    unknown = sorted(set(names) - set(load()))
    if unknown:
        parser.error(f"no recipe entry for {unknown}; recipes: {', '.join(sorted(load()))}")
    unexplained = 0
    for name in names:
        rows = check(name)
        print_table(name, rows, args.differences)
        unexplained += sum(row.differs and not row.note for row in rows)
    if unexplained:
        print(f"{unexplained} difference(s) without a note (the MISSING rows)", file=sys.stderr)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
