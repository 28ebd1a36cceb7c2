"""The wheel a user installs: its size and its largest files, recorded in BENCHMARKS.md ("Package").

    python -m erase_lab.bench_wheel [--top 5] [--no-record]

Builds the wheel from a copy of this checkout in a temporary folder (`python -m build --wheel --no-isolation`: with the
environment's setuptools, so nothing is downloaded; under a minute), then lists what it holds, largest files first.
The wheel ships the erase package: its code, catalogs, presets and the miniature world (erase/assets/mini); this lab
package and the tests stay out (pyproject.toml's packages.find).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SECTION = "Package"
ROOT = Path(__file__).resolve().parent.parent
BUILD = [sys.executable, "-m", "build", "--wheel", "--no-isolation"]


def build_wheel(folder: Path) -> Path:
    """The wheel of this checkout, built from a copy of it in `folder`: no build folder is left in the checkout, and
    none left there by an earlier build is read (setuptools' build/lib keeps files deleted from the sources)."""
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "site", "runs", "*.egg-info",
                                                                "__pycache__"))
    subprocess.run([*BUILD, "--outdir", str(folder)], cwd=source, check=True, capture_output=True)
    return next(folder.glob("*.whl"))


def size_words(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def report(wheel: Path, top: int) -> str:
    """The section: the largest files (compressed in the wheel, unpacked), the rest, the whole wheel."""
    from .benchmarks_md import section_body

    with zipfile.ZipFile(wheel) as archive:
        files = sorted(archive.infolist(), key=lambda f: f.compress_size, reverse=True)
    largest, rest = files[:top], files[top:]
    lines = ["| file | in the wheel | unpacked |", "|---|---|---|"]
    lines += [f"| {f.filename} | {size_words(f.compress_size)} | {size_words(f.file_size)} |" for f in largest]
    lines += [(f"| the other {len(rest)} files | {size_words(sum(f.compress_size for f in rest))} | "
               f"{size_words(sum(f.file_size for f in rest))} |"),
              (f"| **{wheel.name}** ({len(files)} files) | **{size_words(wheel.stat().st_size)}** | "
               f"**{size_words(sum(f.file_size for f in files))}** |")]
    tops = sorted({f.filename.split("/")[0] for f in files})
    left_out = [name for name in ("erase_lab", "tests") if name not in tops]
    mini = sum(f.compress_size for f in files if f.filename.startswith("erase/assets/mini/"))
    protocol = (f"The wheel built from this checkout with `{' '.join(['python', *BUILD[1:]])}`; 'in the wheel' is a "
                "file's compressed size in the archive, 'unpacked' its size once installed; the last row is the wheel "
                f"file itself. Its top-level entries: {', '.join(tops)}"
                + (f" (not {' or '.join(left_out)})" if left_out else "") + ". The miniature world's model and judge "
                f"(erase/assets/mini) take {size_words(mini)} of it.")
    return section_body(["\n".join(lines)], protocol, "`python -m erase_lab.bench_wheel` (under a minute).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=5, help="how many of the largest files to list")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="erase-wheel-") as folder:
        body = report(build_wheel(Path(folder)), args.top)
    print(body)
    if not args.no_record:
        from .benchmarks_md import update_section

        update_section(SECTION, body)


if __name__ == "__main__":
    main()
