#!/usr/bin/env python
"""What one device call would carry, file by file, against its 64 MiB limit.

    python3 benchmarks/device_carry.py --carry .whl          # every file, largest first, and the total
    python3 benchmarks/device_carry.py --carry .whl --summary

The device tool's rule: the working tree travels as "tracked files, untracked files that git does
not ignore, ... and the ignored paths named in carry; 64 MiB in all". So the set is ``git ls-files
--cached --others --exclude-standard`` (files that exist in the working tree) plus every file under
the ``--carry`` paths. ``benchmarks/gpu_check.sh``'s calls carry ``.whl`` (the archive that
``benchmarks/gpu_site.sh`` builds). Exit status 1 when the total is over the limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64
MIB = 1 << 20


def tree_files(repo: Path = REPO) -> Dict[str, int]:
    """``{path: bytes}`` of the files that travel without ``carry``: tracked (present in the working
    tree; a deleted one does not travel) and untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.decode().split("\0")
    sizes = {}
    for name in filter(None, listed):
        path = repo / name
        if path.is_file() or path.is_symlink():  # a link travels as a link
            sizes[name] = path.lstat().st_size
    return sizes


def carried_files(carry: Iterable[str], repo: Path = REPO) -> Dict[str, int]:
    """``{path: bytes}`` of every file under the ``carry`` paths (files or folders, repo-relative)."""
    sizes = {}
    for root in carry:
        top = repo / root
        paths = [top] if top.is_file() else (Path(d) / f for d, _, names in os.walk(top) for f in names)
        for path in paths:
            sizes[str(path.relative_to(repo))] = path.lstat().st_size
    return sizes


def call_files(carry: Iterable[str], repo: Path = REPO) -> Dict[str, int]:
    """Everything one call with ``carry`` sends."""
    return {**tree_files(repo), **carried_files(carry, repo)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", action="append", default=[], help="a path named in the call's carry (repeatable)")
    parser.add_argument("--summary", action="store_true", help="the ten largest files and the totals only")
    args = parser.parse_args(argv)
    missing = [p for p in args.carry if not (REPO / p).exists()]
    tree, carried = tree_files(), carried_files(args.carry)
    files = {**tree, **carried}
    ranked = sorted(files.items(), key=lambda item: (-item[1], item[0]))
    for name, size in ranked[:10] if args.summary else ranked:
        print(f"{size / MIB:9.3f} MiB  {name}")
    total = sum(files.values())
    print(f"tree {sum(tree.values()) / MIB:.2f} MiB ({len(tree)} files) + carry {' '.join(args.carry) or '-'} "
          f"{sum(carried.values()) / MIB:.2f} MiB ({len(carried)} files) = {total / MIB:.2f} MiB "
          f"of the {LIMIT_MIB} MiB a call carries")
    if missing:
        print(f"carry path missing here: {', '.join(missing)}")
    return 0 if total <= LIMIT_MIB * MIB else 1


if __name__ == "__main__":
    sys.exit(main())
