"""Memory and CPU of one idle, real device agent (`fleet-device run`) connected to a broker.

    python benchmarks/agent_footprint.py [--seconds 60]

Samples /proc for the agent process after it has settled; the baseline of the same run
is a bare `python3 -c 'import time; time.sleep(...)'` interpreter.
"""
import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, Broker, answers, free_port, machine, print_figures, wait_for, workdir  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def _rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(pid, seconds):
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    samples = []
    while time.monotonic() - t0 < seconds:
        samples.append(_rss_mb(pid))
        time.sleep(1)
    cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
    return {"rss_mb": round(max(samples), 1), "cpu_percent": round(cpu, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args(argv)
    with workdir("fleet-footprint-") as work:
        broker = Broker(work).start()
        port = free_port()
        agent = subprocess.Popen(
            [str(BIN / "fleet-device"), "run", "--unit-id", str(uuid.uuid4()), "--broker", broker.url,
             "--state-dir", str(work / "state"), "--api", f"127.0.0.1:{port}", "--minion-id-file",
             str(work / "minion_id")],
            stdout=open(work / "agent.log", "ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "FLEET_LOG_LEVEL": "WARNING"},
        )
        baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        try:
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/"), 30, "the agent's local API")
            time.sleep(args.settle)
            rows = [
                {"process": "fleet-device run (idle, connected)", **measure(agent.pid, args.seconds)},
                {"process": "python3 sleeping (baseline)", **measure(baseline.pid, min(args.seconds, 10))},
            ]
            print_figures(f"agent footprint over {args.seconds:.0f} s ({machine()})", rows)
        finally:
            for process in (agent, baseline):
                process.terminate()
                process.wait(10)
            broker.stop()


if __name__ == "__main__":
    main()
