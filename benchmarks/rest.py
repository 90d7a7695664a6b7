"""REST throughput and latency of authenticated list/retrieve against /health, on one server with 2 gunicorn workers.

    python benchmarks/rest.py [--requests 2000] [--concurrency 4] [--devices 200]

Uses ApacheBench (`ab`, apache2-utils) as the client: in C, it leaves the 2 cores to
the server. Each endpoint gets the same number of requests; /health, the cheapest
route there is (one `SELECT 1`), is the baseline of the same run.
"""
import argparse
import re
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Broker, Server, machine, print_figures, workdir  # noqa: E402

import requests  # noqa: E402


def ab(url, requests_count, concurrency, headers=()):
    command = ["ab", "-q", "-n", str(requests_count), "-c", str(concurrency), "-s", "30"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command + [url], capture_output=True, text=True, timeout=300, check=True).stdout
    failed = int(re.search(r"Failed requests:\s+(\d+)", output)[1])
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", output)
    return {
        "requests_per_s": float(re.search(r"Requests per second:\s+([\d.]+)", output)[1]),
        "p50_ms": int(re.search(r"\n\s+50%\s+(\d+)", output)[1]),
        "p99_ms": int(re.search(r"\n\s+99%\s+(\d+)", output)[1]),
        "failed": failed + (int(non_2xx[1]) if non_2xx else 0),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args(argv)
    if args.requests > 20000:
        raise SystemExit("--requests: at most 20,000")
    with workdir("fleet-rest-") as work:
        broker = Broker(work).start()
        server = Server(work, broker.url, web_workers=2, ingest_workers=1).start()
        try:
            headers = server.headers
            device_ids = []
            for index in range(args.devices):
                body = {"name": f"bench-{index}", "unit_id": str(uuid.uuid4())}
                device_ids.append(requests.post(server.url + "/dongle/devices/", json=body, headers=headers,
                                                timeout=30).json()["id"])
            auth = [f"Authorization: {headers['Authorization']}"]
            ab(server.url + "/health", 200, args.concurrency)  # warm up both workers
            endpoints = {
                "GET /health (baseline)": (server.url + "/health", ()),
                "GET /dongle/devices/ (list, first page)": (server.url + "/dongle/devices/", auth),
                "GET /dongle/devices/{id}/ (retrieve)": (f"{server.url}/dongle/devices/{device_ids[0]}/", auth),
            }
            rows = []
            baseline = None
            for name, (url, header) in endpoints.items():
                figures = ab(url, args.requests, args.concurrency, header)
                baseline = baseline or figures["requests_per_s"]
                rows.append({"endpoint": name, **figures,
                             "ratio_to_health": round(figures["requests_per_s"] / baseline, 2)})
                print(rows[-1], file=sys.stderr)
            print_figures(f"REST, 2 gunicorn workers, SQLite, {args.requests} requests at concurrency "
                          f"{args.concurrency} ({machine()})", rows)
        finally:
            server.stop()
            broker.stop()


if __name__ == "__main__":
    main()
