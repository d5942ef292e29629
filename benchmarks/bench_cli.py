"""How long the command line takes to start: ``--help`` of the program and of each subcommand.

Each command runs ``--repeats`` times in a fresh interpreter, alternating
commands; the median wall time is printed beside the bare interpreter's
(``python -c pass``) and the ratio, and ``python -X importtime`` names the
slowest imports of ``blocklowrank --help``. The goal (issue 18): ``blocklowrank
--help`` under 0.3 s on the 2-core machine, which takes importing nothing heavy
(no NumPy, SciPy or scikit-learn); ``tests/test_light_core.py`` checks which
modules it imports, never its time.

Run: .venv/bin/python benchmarks/bench_cli.py [--repeats 15]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "blocklowrank --help": ["-m", "blocklowrank", "--help"],
    "blocklowrank --version": ["-m", "blocklowrank", "--version"],
    "blocklowrank budget --help": ["-m", "blocklowrank", "budget", "--help"],
    "blocklowrank extract --help": ["-m", "blocklowrank", "extract", "--help"],
    "blocklowrank study --help": ["-m", "blocklowrank", "study", "--help"],
}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _once(args):
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=_env())
    return time.perf_counter() - start


def _slowest_imports(n=6):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "blocklowrank", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    return sorted(rows, reverse=True)[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"# python {sys.version.split()[0]}, cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # alternate the commands: a busy moment costs each of them alike
        for name, cmd in COMMANDS.items():
            times[name].append(_once(cmd))
    bare = statistics.median(times["python -c pass"])
    print(f"\n{'command':<32}{'median s':>10}{'min s':>8}{'x bare':>8}")
    for name, t in times.items():
        print(f"{name:<32}{statistics.median(t):>10.3f}{min(t):>8.3f}{statistics.median(t) / bare:>8.1f}")
    print("\nslowest imports of `blocklowrank --help` (cumulative, python -X importtime):")
    for micro, module in _slowest_imports():
        print(f"  {micro / 1e3:8.1f} ms  {module}")


if __name__ == "__main__":
    main()
