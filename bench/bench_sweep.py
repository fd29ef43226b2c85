"""Benchmark the embedded default sweep: wall time and peak memory of every process it starts.

    python3 bench/bench_sweep.py            # `encmm sweep` in a fresh temp dir (teacher trained too), ~10 min
    python3 bench/bench_sweep.py --set resources.local_mode=off

Runs ``encmm sweep`` (the embedded ``experiments/digits.yaml``) as a subprocess in a fresh temporary folder
with ``MLFLOW_TRACKING_URI`` on a SQLite store there, so the teacher is trained first, then the 6 students.
Every 0.5 s it sums the memory of the whole process tree (the CLI, Ray's GCS, raylet, dashboard, workers,
trial drivers): RSS (what the targets name; shared library pages count once per process) and PSS (shared
pages split between the processes sharing them: closer to what the machine really holds). Processes are
the CLI's descendants plus anything in its session. Prints a table; writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_GB = 600.0, 8.0


def read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of ``pid`` from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[3])


def tree_pids(root: int) -> list[int]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := read_stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    found |= {pid for pid, (_, sid) in stats.items() if sid == root}  # the child leads its own session
    return sorted(p for p in found if p in stats)


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB from /proc/<pid>/smaps_rollup (RSS from status when rollup is unreadable)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        try:
            match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
            rss = pss = int(match.group(1)) if match else 0
        except OSError:
            pass
    return rss, pss


def command_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return raw[:120] or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class Sampler(threading.Thread):
    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.peak_breakdown: list = []
        self.samples: list = []

    def run(self) -> None:
        start = time.time()
        while not self.stop.is_set():
            rows = [(pid, *memory_kb(pid)) for pid in tree_pids(self.root)]
            rss, pss = sum(r[1] for r in rows), sum(r[2] for r in rows)
            self.samples.append((round(time.time() - start, 1), rss, pss, len(rows)))
            if rss > self.peak_rss:
                self.peak_rss = rss
                self.peak_breakdown = sorted(((r[1], r[2], command_name(r[0])) for r in rows), reverse=True)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(rows))
            self.stop.wait(self.interval)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default=None, help="sweep file (default: the embedded digits sweep)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="passed to encmm sweep")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (printed)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "sweep.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="encmm-sweep-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "encmm.orchestrator.cli", "sweep", *([args.sweep] if args.sweep else [])]
    for item in args.overrides:
        command += ["--set", item]
    log = folder / "sweep.log"
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = Sampler(proc.pid, args.interval)
        sampler.start()
        code = proc.wait()
    wall = time.time() - start
    time.sleep(2 * args.interval)  # Ray processes outliving the CLI (if any) are still counted
    sampler.stop.set()
    sampler.join()
    text = log.read_text()
    teacher = re.search(r"\[sweep\] (training|reusing) the teacher|\[sweep\] (reusing) teacher", text)
    finished = len(re.findall(r"\| FINISHED \|", text))
    rss_gb, pss_gb = sampler.peak_rss / 2**20, sampler.peak_pss / 2**20
    print("| figure | value | target | ratio to target |\n|---|---|---|---|")
    print(
        f"| wall time (teacher {'trained' if teacher and teacher.group(1) == 'training' else 'reused'}) "
        f"| {wall:.0f} s | <= {TARGET_S:.0f} s | {wall / TARGET_S:.2f} |"
    )
    print(f"| peak RSS, all processes | {rss_gb:.2f} GB | <= {TARGET_GB:g} GB | {rss_gb / TARGET_GB:.2f} |")
    print(f"| peak PSS, all processes | {pss_gb:.2f} GB | (RSS counts shared pages per process) | |")
    print(f"| processes at the peak / most seen | {len(sampler.peak_breakdown)} / {sampler.peak_processes} | | |")
    print(f"| trials FINISHED | {finished} | 6 | |")
    print(f"\nexit code {code}; largest processes at the RSS peak (RSS MB, PSS MB):")
    for rss, pss, name in sampler.peak_breakdown[:8]:
        print(f"  {rss / 1024:7.0f} {pss / 1024:7.0f}  {name}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "nproc": os.cpu_count(),
                "command": command[2:],
                "exit_code": code,
                "wall_s": wall,
                "peak_rss_gb": rss_gb,
                "peak_pss_gb": pss_gb,
                "teacher": "trained" if teacher and teacher.group(1) == "training" else "reused",
                "trials_finished": finished,
                "targets": {"wall_s": TARGET_S, "rss_gb": TARGET_GB},
                "peak_breakdown_mb": [(round(r / 1024), round(p / 1024), n) for r, p, n in sampler.peak_breakdown],
                "samples": sampler.samples,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.json}; log: {log}" + ("" if args.keep else " (folder removed)"))
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
