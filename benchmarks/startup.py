"""Start-up time of the `search` command: `--help`, a usage error, `--version`.

    python benchmarks/startup.py                  # this checkout, 20 runs of each
    python benchmarks/startup.py --repo DIR -n 10 # another checkout (e.g. an older commit)

Each command runs as a fresh `python -m search ...` process from the checkout's root, so that
checkout's `search` package is the one imported. Prints the mean wall and CPU (user + sys)
seconds per run; CPU time is the steadier figure on a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "search --help": ["--help"],
    "search launch (usage error)": ["launch"],
    "search --version": ["--version"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(repo: Path, args: list[str], runs: int) -> tuple[float, float]:
    """Mean (wall, cpu) seconds of `python -m search ARGS` run from `repo`."""
    cpu_before, began = _children_cpu(), time.perf_counter()
    for _ in range(runs):
        subprocess.run([sys.executable, "-m", "search", *args], cwd=repo,
                       capture_output=True, check=False)
    return (time.perf_counter() - began) / runs, (_children_cpu() - cpu_before) / runs


def heavy_modules(repo: Path) -> str:
    code = ("import sys, search.cli; print(','.join(sorted(m for m in ('optuna', 'sqlalchemy', "
            "'pydantic', 'torch') if m in sys.modules)) or 'none')")
    return subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("-n", "--runs", type=int, default=20)
    options = parser.parse_args()
    print(f"checkout {options.repo}; `import search.cli` loads: {heavy_modules(options.repo)}")
    print("| command | wall (s) | cpu (s) |\n|---|---|---|")
    for name, args in COMMANDS.items():
        wall, cpu = measure(options.repo, args, options.runs)
        print(f"| `{name}` | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
