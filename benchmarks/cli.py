"""How long the command line takes, as a ratio to ``python -c pass`` measured in the same run.

Each command runs in a fresh interpreter (as a CI step would), ``--repeat`` times, interleaved
with the baseline; reported: the median wall time and its ratio to the median of
``python -c pass``, and which of torch / lightning / wandb the command imported.

    PYTHONPATH=. python benchmarks/cli.py              # gate on a small gate.json, --help, methods (static, live)
    PYTHONPATH=. python benchmarks/cli.py --repeat 9
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROBE = ("import sys, runpy; sys.argv = ['xai-callbacks'] + sys.argv[1:]; "
         "code = 0\ntry:\n    runpy.run_module('xai_callbacks.cli', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('IMPORTED', [m for m in ('torch', 'lightning', 'wandb') if m in sys.modules], file=sys.stderr)\n"
         "sys.exit(code)")


def gate_json(folder: str) -> str:
    """A gate report like a SpRAy run writes: 10 classes, 4 scalars each, 3 epochs."""
    sys.path.insert(0, os.getcwd())
    from xai_callbacks.gate import DEFAULT_RULES, write_report

    values = {f"spray/{c}/{k}": 0.1 for c in range(10) for k in ("max_suspicion", "n_clusters",
                                                                "suspicious_strategy", "novelty")}
    epochs = [{"epoch": e, "step": 100 * e, "passed": True, "checks": [], "values": values} for e in range(3)]
    return str(write_report(os.path.join(folder, "gate.json"), DEFAULT_RULES, epochs,
                            final={"epoch": 3, "passed": True, "missing": []}))


def timed(cmd: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - start
    imported = next((line.split(" ", 1)[1] for line in done.stderr.splitlines() if line.startswith("IMPORTED")), "")
    return took, done.returncode, imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (median reported)")
    parser.add_argument("--no-live", action="store_true", help="skip `methods --live` (imports torch: slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = gate_json(tmp)
        commands = {"python -c pass": [sys.executable, "-c", "pass"],
                    "xai-callbacks --help": [sys.executable, "-c", PROBE, "--help"],
                    "xai-callbacks gate gate.json": [sys.executable, "-c", PROBE, "gate", report],
                    "xai-callbacks gate no-such-dir": [sys.executable, "-c", PROBE, "gate", tmp + "/nope"],
                    "xai-callbacks methods": [sys.executable, "-c", PROBE, "methods"]}
        if not args.no_live:
            commands["xai-callbacks methods --live"] = [sys.executable, "-c", PROBE, "methods", "--live"]
        times = {name: [] for name in commands}
        info = {}
        for _ in range(args.repeat):
            for name, cmd in commands.items():  # interleaved, so load changes hit all alike
                took, code, imported = timed(cmd)
                times[name].append(took)
                info[name] = (code, imported)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':32s} {'median s':>9s} {'x python -c pass':>17s}  exit  imported")
    for name, ts in times.items():
        code, imported = info[name]
        print(f"{name:32s} {statistics.median(ts):9.3f} {statistics.median(ts) / base:17.1f}  {code:>4}  {imported}")
    print(json.dumps({name: round(statistics.median(ts), 4) for name, ts in times.items()}))


if __name__ == "__main__":
    main()
