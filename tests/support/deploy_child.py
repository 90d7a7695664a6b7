"""A deploy in a process of its own that halts at a chosen step, so a test can SIGKILL it there.

Usage: python -m tests.support.deploy_child CONFIG.json. The config names the unit, state dir,
project, release message, and `halt_at` = [action, "started" | "done", nth]; when the deploy
reaches that point the process writes `halted` into the state dir and waits to be killed.
"""
import json
import sys
import time
from pathlib import Path

from fleet_device.deploy import Deployer
from tests.support.deploy import TRUSTING


def main(config_path: str):
    config = json.loads(Path(config_path).read_text())
    action, when, nth = config["halt_at"]
    seen = {"count": 0}
    halted = Path(config["state_dir"]) / "halted"

    def on_step(step, moment):
        if step.action == action and moment == when:
            seen["count"] += 1
            if seen["count"] == nth:
                halted.write_text(f"{action} {when} {nth}")
                time.sleep(3600)

    deployer = Deployer(config["unit_id"], Path(config["state_dir"]), settle_seconds=config.get("settle", 0.5),
                        stop_timeout=2, on_step=on_step, policy=TRUSTING)
    message = config["message"]
    deployer.apply(message["project_id"], message["release"], {}, previous=config.get("previous"), context=message)
    (Path(config["state_dir"]) / "finished").write_text("finished")


if __name__ == "__main__":
    main(sys.argv[1])
