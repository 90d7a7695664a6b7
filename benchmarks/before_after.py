"""Benchmarks before and after a change, in the same run: a revision against the current checkout, taking turns.

    .venv/bin/python benchmarks/before_after.py [--before 6bebb32] [--after REV] [--rounds 2]
                                                [--only rtt,rest,telemetry,fanout,release_cpu] [sizes, see --help]

"Before" is a temporary `git worktree` of `--before` (removed at the end); "after" is this
checkout as it is on disk (or `--after REV`, another temporary worktree). Each benchmark runs
`--rounds` times for each tree, the trees taking turns (before, after, before, after, ...), so
load from elsewhere on the machine falls on both alike. Every run is a subprocess of the
tree's own script with `PYTHONPATH=<tree>`, from a scratch directory outside both trees
(`python -m gunicorn` puts the working directory first on the import path). Two exceptions
run this checkout's script against each tree: `release_cpu` (a device's CPU per release
message; older trees have no script for it), and `telemetry`, because the device in older
trees' telemetry.py never confirms its batches, so their ingest stalls after the first one.
The servers that telemetry.py starts import the tree (their PYTHONPATH); its device in the
script's own process is this checkout's code, speaking the same wire to both.

Prints one JSON document (every run, every figure's values per tree, medians and the ratio
after/before), then the same figures as a markdown table. A run that fails is reported with
the end of its output and leaves its figures empty; the others go on.

Every load is bounded (the sizes below, and a time limit per run) and stays on loopback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "6bebb32"  # the code before the structural change of the wire contract and packages
BENCHMARKS = ("rtt", "rest", "telemetry", "fanout", "release_cpu")


# --- reading the scripts' output ---------------------------------------------------------


def figure_blocks(output: str) -> dict[str, list]:
    """The `## title` + JSON blocks that harness.print_figures writes: title → rows."""
    blocks, decoder = {}, json.JSONDecoder()
    for match in re.finditer(r"^## (.+)$", output, re.MULTILINE):
        rows, _end = decoder.raw_decode(output[match.end():].lstrip())
        blocks[match[1]] = rows
    return blocks


def only_block(output: str, title_start: str) -> list:
    for title, rows in figure_blocks(output).items():
        if title.startswith(title_start):
            return rows
    raise ValueError(f"no figures titled {title_start!r} in the output")


def search(pattern: str, output: str) -> re.Match:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise ValueError(f"no line matching {pattern!r} in the output")
    return match


def parse_rtt(output: str) -> dict[str, float]:
    # command_rtt.py's summary lines: "<name>  n=200  p50=  6.90 ms  p99= 15.80 ms ..."
    times = r"\s+n=\d+\s+p50=\s*([\d.]+) ms\s+p99=\s*([\d.]+) ms"
    fleet = search(r"^POST sent → result stored" + times, output)
    floor = search(r"^POST sent → result stored \(floor\)" + times, output)
    ratio = search(r"^Fleet / floor at p50: .*POST sent → stored ([\d.]+)x", output)
    return {
        "command round trip, POST sent → stored, p50 (ms)": float(fleet[1]),
        "command round trip, POST sent → stored, p99 (ms)": float(fleet[2]),
        "the floor of bare parts, POST sent → stored, p50 (ms)": float(floor[1]),
        "command round trip p50 / the floor's (×)": float(ratio[1]),
    }


def parse_rest(output: str) -> dict[str, float]:
    rows = {row["endpoint"]: row for row in only_block(output, "REST")}

    def endpoint(start: str) -> dict:
        return next(row for name, row in rows.items() if name.startswith(start))

    health = endpoint("GET /health")
    retrieve = endpoint("GET /dongle/devices/{id}/")
    page = endpoint("GET /dongle/devices/ (list, first page of 100)")
    return {
        "REST /health (req/s)": health["requests_per_s"],
        "REST retrieve / /health (×)": retrieve["ratio_to_health"],
        "REST retrieve p99 (ms)": retrieve["p99_ms"],
        "REST retrieve, server CPU per request (ms)": retrieve["server_cpu_ms_per_request"],
        "REST list, page of 100 / /health (×)": page["ratio_to_health"],
        "REST list, page of 100, p99 (ms)": page["p99_ms"],
        "REST list, page of 100, server CPU per request (ms)": page["server_cpu_ms_per_request"],
        "REST failed requests": sum(row["failed"] for row in rows.values()),
    }


def parse_telemetry(output: str) -> dict[str, float]:
    figures = {}
    ingest = r"^\[(\w+)\] ingest: (\d+)/(\d+) readings stored \((\d+) distinct\) .*= ([\d,]+) readings/s"
    for match in re.finditer(ingest, output, re.MULTILINE):
        database, stored, sent, distinct, rate = match.groups()
        figures[f"telemetry ingest, {database} (readings/s)"] = int(rate.replace(",", ""))
        figures[f"telemetry ingest, {database}, readings lost or duplicated"] = (
            int(sent) - int(distinct) + int(stored) - int(distinct))
    if not figures:
        raise ValueError("no ingest line in the output")
    return figures


def parse_fanout(output: str) -> dict[str, float]:
    figures = {}
    for row in only_block(output, "release fan-out"):
        size = f"{row['devices']:,} devices"
        figures[f"release fan-out to {size}, all acknowledged (s)"] = row["release_acknowledged_by_all_s"]
        figures[f"release fan-out to {size}, all `queued` reports stored (s)"] = row["queued_reports_stored_s"]
        figures[f"release fan-out to {size}, broker and devices alone (s)"] = row["baseline_broker_only_all_s"]
        if "device_cpu_ms_per_release_message" in row:  # trees whose fleet_sim.py measures it
            figures[f"release fan-out to {size}, device CPU per release message (ms)"] = (
                row["device_cpu_ms_per_release_message"])
    return figures


def parse_release_cpu(output: str) -> dict[str, float]:
    result = json.loads(output.strip().splitlines()[-1])
    figures = {}
    if "cpu_ms_per_message" in result["handling"]:  # absent when the tree's agent could not be run
        figures["simulated device CPU per release message, whole handling (ms)"] = (
            result["handling"]["cpu_ms_per_message"])
    figures["simulated device CPU per release message, decoding alone (ms)"] = result["decoding"]["cpu_ms_per_message"]
    return figures


# --- the benchmarks ------------------------------------------------------------------------


@dataclass
class Benchmark:
    name: str
    script: str  # path inside a tree
    arguments: Callable[[argparse.Namespace], list[str]]
    parse: Callable[[str], dict[str, float]]
    timeout: float  # seconds, for one run
    # Run this checkout's script against the tree, not the tree's own: where an older tree's script
    # lacks the figure or cannot measure it any more. See `run_once` for what then comes from where.
    from_checkout: bool = False


BENCHMARK_TABLE = {
    "rtt": Benchmark("rtt", "benchmarks/command_rtt.py",
                     lambda a: ["--runs", str(a.rtt_runs), "--warmup", str(a.rtt_warmup), "--client-runs", "0"],
                     parse_rtt, timeout=900),
    "rest": Benchmark("rest", "benchmarks/rest.py",
                      lambda a: ["--requests", str(a.rest_requests), "--concurrency", "4"],
                      parse_rest, timeout=1200),
    "telemetry": Benchmark("telemetry", "benchmarks/telemetry.py",
                           lambda a: ["--database", a.telemetry_database, "--readings", str(a.telemetry_readings),
                                      "--stored", str(a.telemetry_stored), "--repeats", "10"],
                           parse_telemetry, timeout=1800, from_checkout=True),
    "fanout": Benchmark("fanout", "benchmarks/fleet_sim.py",
                        lambda a: ["fanout", "--sizes", a.fanout_sizes],
                        parse_fanout, timeout=1800),
    "release_cpu": Benchmark("release_cpu", "benchmarks/release_cpu.py",
                             lambda a: ["--messages", str(a.release_messages)],
                             parse_release_cpu, timeout=300, from_checkout=True),
}


@dataclass
class Tree:
    side: str  # "before" or "after"
    path: Path
    revision: str  # what was asked for
    commit: str  # what it resolved to (with "+ changes on disk" for a checkout that has some)


@dataclass
class Run:
    benchmark: str
    side: str
    round: int
    seconds: float
    figures: dict = field(default_factory=dict)
    error: str | None = None


def machine() -> str:
    sys.path.insert(0, str(CHECKOUT / "benchmarks"))
    from harness import machine as describe  # this checkout's description of the machine

    return describe()


def git(*args: str, cwd: Path = CHECKOUT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


def temporary_worktree(side: str, revision: str, parent: Path) -> Tree:
    path = parent / side
    git("worktree", "add", "--detach", str(path), revision)
    return Tree(side, path, revision, git("rev-parse", "HEAD", cwd=path))


def this_checkout() -> Tree:
    commit = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + changes on disk"
    return Tree("after", CHECKOUT, "the current checkout", commit)


def run_script(command: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str]:
    """Run a benchmark script in a process group of its own: (exit status, stdout, stderr).

    Should it outlive `timeout` or this run end early, the whole group is stopped, so the
    broker, servers and devices it started do not stay behind.
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    finally:
        if process.poll() is None:
            stop_group(process)


def stop_group(process: subprocess.Popen):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def run_once(benchmark: Benchmark, tree: Tree, number: int, args, scratch: Path) -> Run:
    script = (CHECKOUT if benchmark.from_checkout else tree.path) / benchmark.script
    env = {**os.environ, "PYTHONPATH": str(tree.path)}
    began = time.monotonic()
    print(f"{datetime.now(timezone.utc):%H:%M:%S} {benchmark.name} round {number} {tree.side} ...",
          file=sys.stderr, flush=True)
    run = Run(benchmark.name, tree.side, number, 0.0)
    try:
        returncode, stdout, stderr = run_script([sys.executable, str(script), *benchmark.arguments(args)],
                                                scratch, env, benchmark.timeout)
        if returncode != 0:
            run.error = f"exit status {returncode}: {(stderr or stdout)[-1500:]}"
        else:
            run.figures = benchmark.parse(stdout)
    except subprocess.TimeoutExpired:
        run.error = f"did not finish within {benchmark.timeout:.0f} s"
    except (ValueError, KeyError, StopIteration) as exc:
        run.error = f"unexpected output: {exc!r}"
    run.seconds = round(time.monotonic() - began, 1)
    print(f"    {run.seconds:.0f} s{'' if run.error is None else ', FAILED: ' + run.error.splitlines()[0]}",
          file=sys.stderr, flush=True)
    return run


def summary(runs: list[Run]) -> list[dict]:
    """Per figure, in the order first seen: each tree's values over the rounds, medians and after/before."""
    names = list(dict.fromkeys(name for run in runs for name in run.figures))
    rows = []
    for name in names:
        values = {side: [run.figures[name] for run in runs if run.side == side and name in run.figures]
                  for side in ("before", "after")}
        medians = {side: statistics.median(v) if v else None for side, v in values.items()}
        ratio = (round(medians["after"] / medians["before"], 3)
                 if medians["before"] and medians["after"] is not None else None)
        rows.append({"figure": name, "before": values["before"], "after": values["after"],
                     "before_median": medians["before"], "after_median": medians["after"], "after_over_before": ratio})
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(median, values) -> str:
        if median is None:
            return "—"
        shown = f"{median:g}"
        return shown + (f" ({' / '.join(f'{v:g}' for v in values)})" if len(values) > 1 else "")

    lines = ["| figure | before | after | after/before |", "| --- | --- | --- | --- |"]
    for row in rows:
        ratio = "—" if row["after_over_before"] is None else f"{row['after_over_before']:.2f}"
        lines.append(f"| {row['figure']} | {cell(row['before_median'], row['before'])} | "
                     f"{cell(row['after_median'], row['after'])} | {ratio} |")
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=DEFAULT_BEFORE,
                        help=f"revision measured as before (default {DEFAULT_BEFORE})")
    parser.add_argument("--after", default=None, help="revision measured as after (default: this checkout as it is)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each benchmark per tree, taking turns (default 2)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--rtt-runs", type=int, default=200, help="timed commands per round trip run (default 200)")
    parser.add_argument("--rtt-warmup", type=int, default=100, help="commands before timing (default 100)")
    parser.add_argument("--rest-requests", type=int, default=1000, help="requests per endpoint (default 1000)")
    parser.add_argument("--telemetry-database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--telemetry-readings", type=int, default=50_000, help="readings ingested (default 50000)")
    parser.add_argument("--telemetry-stored", type=int, default=20_000,
                        help="rows stored for the script's read part, which is not compared here (default 20000; "
                             "1000000 for the full read benchmark)")
    parser.add_argument("--fanout-sizes", default="10000", help="devices per release, comma-separated (default 10000)")
    parser.add_argument("--release-messages", type=int, default=2000,
                        help="release messages for the CPU per message (default 2000)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown or not args.only:
        parser.error(f"--only: {', '.join(unknown) or 'nothing'} is not one of {', '.join(BENCHMARKS)}")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds: 1..10")
    if not 1 <= args.rtt_runs <= 10000 or not 0 <= args.rtt_warmup <= 1000:
        parser.error("--rtt-runs: 1..10000, --rtt-warmup: 0..1000")
    if not 10 <= args.rest_requests <= 20000:
        parser.error("--rest-requests: 10..20000")
    if not 1000 <= args.telemetry_readings <= 1_000_000 or not 1000 <= args.telemetry_stored <= 1_000_000:
        parser.error("--telemetry-readings and --telemetry-stored: 1000..1000000")
    if not all(size.isdigit() and 1 <= int(size) <= 20000 for size in args.fanout_sizes.split(",")):
        parser.error("--fanout-sizes: comma-separated device counts, each 1..20000")
    if not 1 <= args.release_messages <= 20000:
        parser.error("--release-messages: 1..20000")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    # A SIGTERM ends the run through the `finally` below, so the temporary worktrees go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, began = datetime.now(timezone.utc), time.monotonic()
    load_before = os.getloadavg()
    parent = Path(tempfile.mkdtemp(prefix="fleet-before-after-"))
    scratch = parent / "scratch"
    scratch.mkdir()
    trees: list[Tree] = []
    runs: list[Run] = []
    try:
        trees.append(temporary_worktree("before", args.before, parent))
        trees.append(this_checkout() if args.after is None else temporary_worktree("after", args.after, parent))
        for number in range(1, args.rounds + 1):
            for name in args.only:
                for tree in trees:
                    runs.append(run_once(BENCHMARK_TABLE[name], tree, number, args, scratch))
    finally:
        for tree in trees:
            if tree.path != CHECKOUT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree.path)], cwd=CHECKOUT,
                               capture_output=True, timeout=120)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=CHECKOUT, capture_output=True, timeout=120)
    rows = summary(runs)
    document = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - began),
        "machine": machine(),
        "load_average_at_start_and_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "trees": {tree.side: {"revision": tree.revision, "commit": tree.commit} for tree in trees},
        "rounds": args.rounds,
        "options": {key: value for key, value in vars(args).items() if key not in ("before", "after", "rounds")},
        "runs": [vars(run) for run in runs],
        "figures": rows,
    }
    print(json.dumps(document, indent=1, ensure_ascii=False))
    print()
    print(markdown(rows))
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
