"""How long the deploy engine takes: planning (pure), a replace, a rollback, and recovery after a kill.

Runs against the local Docker engine with busybox images it builds and removes itself.
Bounded: --rounds deploys of each kind (default 5). Usage:
    .venv/bin/python -m benchmarks.deploy_cycle [--rounds N]
"""
import argparse
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import docker

from fleet_device.deploy import DeployError, Deployer, DeviceState, Running, plan
from tests.support.deploy import SERVE, message, release, spec
from tests.support.infra import build_busybox_variant

log = logging.getLogger("benchmarks.deploy_cycle")


def _ms(samples):
    return f"median {statistics.median(samples) * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms"


def bench_plan(containers: int, repeat: int = 1000) -> float:
    doc = release(2, *[spec(f"c{i}", f"img{i}:v2", required_tags=["base"]) for i in range(containers)])
    state = DeviceState(tuple(Running(f"c{i}", "1", "1", "00000000", True, f"img{i}:v1") for i in range(containers)),
                        frozenset(f"img{i}:v1" for i in range(containers)), None, frozenset())
    started = time.perf_counter()
    for _ in range(repeat):
        plan(1, doc, state, {})
    return (time.perf_counter() - started) / repeat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 51), metavar="N (1-50)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    client = docker.from_env(timeout=60)
    tag = uuid.uuid4().hex[:8]
    images = [build_busybox_variant(client, f"fleet-bench/deploy-{tag}:{v}", cmd=SERVE) for v in ("a", "b")]
    broken = build_busybox_variant(client, f"fleet-bench/deploy-{tag}:broken", cmd=["false"])
    unit_id = str(uuid.uuid4())
    name = f"fleet-bench-deploy-{tag}"
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as state_dir:
        deployer = Deployer(unit_id, Path(state_dir), client=client, settle_seconds=0.0, stop_timeout=5)
        try:
            replace, rollback = [], []
            previous = None
            for index in range(args.rounds * 2):
                doc = release(index + 1, spec(name, images[index % 2]))
                started = time.perf_counter()
                # Both images stay "needed" so the replace never prunes the one the next round runs.
                deployer.apply(1, doc, {}, previous=previous, needed_elsewhere=frozenset(images),
                               context=message(1, doc))
                replace.append(time.perf_counter() - started)
                deployer.forget(1)
                previous = doc
            # A settle period is what catches the exiting container; 1 s of each figure is that wait.
            deployer.settle_seconds = 1.0
            for index in range(args.rounds):
                doc = release(1000 + index, spec(name, broken))
                started = time.perf_counter()
                try:
                    deployer.apply(1, doc, {}, previous=previous, needed_elsewhere=frozenset(images),
                                   context=message(1, doc))
                except DeployError:
                    pass
                rollback.append(time.perf_counter() - started)
                deployer.forget(1)
        finally:
            for container in client.containers.list(all=True, filters={"label": f"fleet.unit_id={unit_id}"}):
                container.remove(force=True)
            for image in (*images, broken):
                try:
                    client.images.remove(image, force=True)
                except docker.errors.ImageNotFound:
                    pass
    print(f"plan, 1 container:   {bench_plan(1) * 1e6:.1f} us")
    print(f"plan, 50 containers: {bench_plan(50) * 1e6:.1f} us")
    print(f"replace 1 container (settle 0, {len(replace)} deploys): {_ms(replace)}")
    print(f"failed deploy + rollback (container exits, settle 1 s, {len(rollback)} deploys): {_ms(rollback)}")


if __name__ == "__main__":
    main()
