"""REST throughput and latency of authenticated list/retrieve against /health, on one server with 2 gunicorn workers.

    python benchmarks/rest.py [--requests 1000] [--concurrency 4] [--devices 200] [--rounds 5]
                              [--threads N] [--no-keepalive] [--list-limit 20 ...] [--detailed]

One client for every endpoint: ApacheBench (`ab`, apache2-utils), in C, so it leaves most
of the 2 cores it shares with the server to the server. Keep-alive connections for every
endpoint (`ab -k`) unless --no-keepalive. The endpoints take turns, `--rounds` times, so
that a burst of load from elsewhere on the machine hits all of them alike; each gets
`--requests` requests in all, and its p50/p99 are over every one of its requests (from
`ab -g`). /health, the cheapest route there is (one `SELECT 1`), is the baseline of the
same run. Each row also gives the CPU time gunicorn's workers spent per request, a
figure that load from elsewhere on the machine disturbs far less than the rates do.
`--threads` is passed to `fleet-server serve` (gunicorn's gthread workers).
The devices are registered through the API with a name and a unit id only; with
`--detailed` each also gets two tags, a description, an agent version, a last-seen time
and two releases it runs (written straight to the database), as a working fleet has.
"""
import argparse
import contextlib
import csv
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Broker, Server, machine, percentile, print_figures, workdir  # noqa: E402

import requests  # noqa: E402


class RestServer(Server):
    """The benchmark's server, with extra options for `fleet-server serve`."""

    def __init__(self, *args, serve_options=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.serve_options = list(serve_options)

    def spawn(self, name, *args):
        return super().spawn(name, *args, *(self.serve_options if name == "api" else ()))

    def web_cpu_seconds(self) -> float:
        """CPU time used so far by gunicorn's workers (the children of the `serve` process, which is gunicorn)."""
        master = self.processes[0].pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        ticks = 0
        for pid in children:
            with contextlib.suppress(OSError):
                # Fields 14 and 15 (utime, stime), counted after the parenthesised command name.
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def ab(url, requests_count, concurrency, headers=(), keepalive=True, timings_file=None):
    """Run ab once; returns its wall time, its failures and each request's total time (ms)."""
    command = ["ab", "-q", "-n", str(requests_count), "-c", str(concurrency), "-s", "30"]
    if keepalive:
        command.append("-k")
    if timings_file is not None:
        command += ["-g", str(timings_file)]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command + [url], capture_output=True, text=True, timeout=300, check=True).stdout
    failed = int(re.search(r"Failed requests:\s+(\d+)", output)[1])
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", output)
    timings = []
    if timings_file is not None:
        with open(timings_file) as handle:
            timings = [int(row["ttime"]) for row in csv.DictReader(handle, delimiter="\t")]
    return {
        "seconds": float(re.search(r"Time taken for tests:\s+([\d.]+)", output)[1]),
        "failed": failed + (int(non_2xx[1]) if non_2xx else 0),
        "timings_ms": timings,
    }


def detail_devices(server, device_ids):
    """Give every device what a working fleet's have: tags, a description, an agent version, a last-seen
    time, and two releases it runs (deployments in state succeeded)."""
    from datetime import datetime, timezone

    from fleet_server.extensions import db
    from fleet_server.models import Deployment, Device, Project, Release

    app = server.app()
    with app.app_context():
        project = Project(name="bench")
        releases = [Release(project=project, version=f"1.{n}", version_hash=f"{n:08x}") for n in range(2)]
        db.session.add_all([project, *releases])
        db.session.flush()
        seen = datetime.now(timezone.utc)
        for device in db.session.scalars(db.select(Device).where(Device.id.in_(device_ids))):
            device.tags, device.description, device.agent_version = ["north", "route-7"], "Delivery van", "1.4.2"
            device.last_seen_at, device.online = seen, True
            db.session.add_all([Deployment(release_id=release.id, device_id=device.id, state="succeeded")
                                for release in releases])
        db.session.commit()
    with app.app_context():
        db.engine.dispose()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="per endpoint, over all rounds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads per worker (serve's default)")
    parser.add_argument("--no-keepalive", dest="keepalive", action="store_false")
    parser.add_argument("--list-limit", type=int, action="append", default=[],
                        help="also list pages of this size (the default page is 100)")
    parser.add_argument("--detailed", action="store_true",
                        help="devices with tags, description, agent version, last-seen time and two running releases")
    args = parser.parse_args(argv)
    if args.requests > 20000:
        raise SystemExit("--requests: at most 20,000")
    if not 1 <= args.rounds <= args.requests:
        raise SystemExit("--rounds: between 1 and --requests")
    serve_options = [] if args.threads is None else ["--threads", str(args.threads)]
    with workdir("fleet-rest-") as work:
        broker = Broker(work).start()
        server = RestServer(work, broker.url, web_workers=2, ingest_workers=1, serve_options=serve_options).start()
        try:
            headers = server.headers
            device_ids = []
            for index in range(args.devices):
                body = {"name": f"bench-{index}", "unit_id": str(uuid.uuid4())}
                device_ids.append(requests.post(server.url + "/dongle/devices/", json=body, headers=headers,
                                                timeout=30).json()["id"])
            if args.detailed:
                detail_devices(server, device_ids)
            auth = [f"Authorization: {headers['Authorization']}"]
            endpoints = {
                "GET /health (baseline)": (server.url + "/health", ()),
                "GET /dongle/devices/ (list, first page of 100)": (server.url + "/dongle/devices/", auth),
                **{f"GET /dongle/devices/?limit={limit} (list, first page of {limit})":
                   (f"{server.url}/dongle/devices/?limit={limit}", auth) for limit in args.list_limit},
                "GET /dongle/devices/{id}/ (retrieve)": (f"{server.url}/dongle/devices/{device_ids[0]}/", auth),
            }
            for url, header in endpoints.values():  # warm up both workers on every route
                ab(url, 200, args.concurrency, header, args.keepalive)
            runs = {name: [] for name in endpoints}
            per_round = args.requests // args.rounds
            for round_index in range(args.rounds):
                for name, (url, header) in endpoints.items():
                    cpu_before = server.web_cpu_seconds()
                    runs[name].append(ab(url, per_round, args.concurrency, header, args.keepalive,
                                         work / f"timings-{round_index}.tsv"))
                    runs[name][-1]["server_cpu_s"] = server.web_cpu_seconds() - cpu_before
            rows = []
            for name, endpoint_runs in runs.items():
                timings = [ms for run in endpoint_runs for ms in run["timings_ms"]]
                rate = len(timings) / sum(run["seconds"] for run in endpoint_runs)
                rows.append({"endpoint": name, "requests_per_s": round(rate, 1),
                             "p50_ms": percentile(timings, 0.5), "p99_ms": percentile(timings, 0.99),
                             "server_cpu_ms_per_request": round(
                                 1000 * sum(run["server_cpu_s"] for run in endpoint_runs) / len(timings), 2),
                             "failed": sum(run["failed"] for run in endpoint_runs)})
            baseline = rows[0]["requests_per_s"]
            for row in rows:
                row["ratio_to_health"] = round(row["requests_per_s"] / baseline, 2)
            devices_kind = "detailed devices" if args.detailed else "devices with a name and a unit id"
            server_kind = f"{args.threads} threads per worker" if args.threads else "serve's default worker settings"
            print_figures(f"REST, 2 gunicorn workers ({server_kind}), SQLite, {args.devices} {devices_kind}, "
                          f"{per_round * args.rounds} requests per "
                          f"endpoint in {args.rounds} rounds at concurrency {args.concurrency}, "
                          f"{'keep-alive' if args.keepalive else 'a connection per request'} ({machine()})", rows)
        finally:
            server.stop()
            broker.stop()


if __name__ == "__main__":
    main()
