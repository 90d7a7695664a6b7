"""The deploy engine: plan the change from what runs to what a release wants, then carry it out.

`plan()` (plan.py) is pure: current device state + target release → an ordered list of typed
steps. `Deployer` runs those steps through the executor's table of actions against the Docker
engine, writing each one to the journal before and after it acts. When a step fails it undoes
what it did, in reverse, so the device keeps running what it ran; when the agent was killed
mid-deploy, `Deployer.recover()` reads the journal and completes or rolls back.
See docs/deploy.md for the state machine and the failure modes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import docker

from fleet_wire.release_policy import ReleasePolicy
from . import executor
from .docker_engine import DockerEngine
from .errors import DeployError
from .executor import Deploy, Timing
from .journal import (
    CHANGING, COMMITTING, ROLLED_BACK, ROLLING_BACK, SUCCEEDED, DeployJournal, DeployRecord, Failure,
)
from .plan import DeviceState, check_policy, plan
from .steps import COMMIT, Step

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    """What became of a deploy the agent found in its journal at start-up."""

    project_id: int
    context: dict | None
    state: str  # succeeded | failed | rolled_back
    step: str | None
    detail: str
    settled: bool = True  # False: the rollback could not finish yet (engine away); retried later


class Deployer:
    """Runs plans against the Docker engine, journalled, undoing them when a step fails."""

    def __init__(self, unit_id: str, state_dir: Path, client: docker.DockerClient | None = None,
                 settle_seconds: float = 10.0, health_timeout: float = 60.0, stop_timeout: int = 10,
                 report: Callable | None = None, on_step: Callable | None = None,
                 policy: ReleasePolicy = ReleasePolicy()):
        self.unit_id = unit_id
        self.engine = DockerEngine(unit_id, client)
        self.policy = policy  # what a release may hold; anything more is refused before the plan
        self.journal = DeployJournal(state_dir)
        self.settle_seconds = settle_seconds
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        # report(state, step, detail): progress for the deployments topic.
        self.report = report or (lambda state, step=None, detail="": None)
        # on_step(step, "started" | "done"): a hook for observers (and crash tests).
        self.on_step = on_step or (lambda step, when: None)

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    def observe(self, previous: dict | None = None, needed_elsewhere=frozenset()) -> DeviceState:
        return self.engine.observe(previous, needed_elsewhere)

    def login_all(self, registries: dict[int, dict]) -> dict[str, str]:
        return self.engine.login_all(registries)

    def _deploy(self, record: DeployRecord) -> Deploy:
        # The timing is read on every deploy: a caller may change it between two.
        return Deploy(self.engine, record, self.journal,
                      Timing(self.settle_seconds, self.health_timeout, self.stop_timeout))

    # --- applying ---------------------------------------------------------------

    def apply(self, project_id: int, release: dict | None, registries: dict[int, dict], previous: dict | None = None,
              needed_elsewhere=frozenset(), context: dict | None = None) -> list[Step]:
        """Apply one project's release; returns the steps taken ([] when it already runs).

        Raises DeployError after rolling back. The journal stays until `forget()` so the
        caller can record the outcome first; `context` is kept in it for `recover()`.
        """
        if not self.settled(project_id):
            raise DeployError("recover", "an interrupted deploy of this project is not resolved yet "
                                         "(the engine did not answer the rollback); it is retried first")
        self.engine.registries = registries
        state = self.engine.observe(previous, needed_elsewhere)
        if release is not None:
            check_policy(release, state, self.policy)
        steps = plan(project_id, release, state, registries)
        if not steps:
            return steps
        deploy = self._deploy(DeployRecord.begin(project_id, release, steps, context))
        deploy.save()
        announced = None
        try:
            for index, step in enumerate(steps):
                if step.phase == COMMIT:
                    break
                if step.progress != announced:
                    announced = step.progress
                    self.report(announced, step.action)
                executor.run(deploy, index, step, self.on_step)
        except DeployError as exc:
            self._roll_back(deploy, exc)
        executor.commit(deploy, self.on_step)
        return steps

    def settled(self, project_id: int) -> bool:
        """Whether nothing of a deploy of this project is left to finish or undo."""
        record = self.journal.load(project_id)
        return record is None or record.settled

    def forget(self, project_id: int):
        """Drop a finished deploy's journal once its outcome is recorded; an unfinished one stays."""
        record = self.journal.load(project_id)
        if record is not None and record.settled:
            self.journal.discard(project_id)

    def _roll_back(self, deploy: Deploy, failure: DeployError):
        record = deploy.record
        log.warning("project=%s release=%s step=%s failed: %s; rolling back", record.project_id,
                    record.release_id, failure.step, failure.reason)
        record.phase = ROLLING_BACK
        record.failure = Failure(failure.step, failure.reason)
        deploy.save()
        problems = executor.undo_all(deploy)
        if problems:
            raise DeployError(failure.step, f"{failure.reason}; rollback incomplete ({'; '.join(problems)}), "
                                            "retried before the next deploy")
        record.phase = ROLLED_BACK
        deploy.save()
        raise failure

    # --- recovering ---------------------------------------------------------------

    def recover(self) -> list[Recovery]:
        """Resolve every deploy the journal holds: finish committed ones, roll back the rest."""
        return [self._recover(self._deploy(record)) for record in self.journal.records()]

    def _recover(self, deploy: Deploy) -> Recovery:
        record = deploy.record
        project_id, context = record.project_id, record.context
        if record.phase in (COMMITTING, SUCCEEDED):
            if record.phase == COMMITTING:
                log.info("project=%s: completing a verified deploy interrupted while cleaning up", project_id)
                executor.commit(deploy, self.on_step)
            return Recovery(project_id, context, "succeeded", "commit", "completed after the agent restarted")
        if record.phase in (CHANGING, ROLLING_BACK):
            if record.failure is None:
                step = self._interrupted_step(record)
                record.failure = Failure(step, f"the agent stopped during {step}", interrupted=True)
            record.phase = ROLLING_BACK
            deploy.save()
            problems = executor.undo_all(deploy)
            if problems:
                return Recovery(project_id, context, "failed", record.failure.step,
                                f"{record.failure.reason}; rollback incomplete: {'; '.join(problems)}",
                                settled=False)
            record.phase = ROLLED_BACK
            deploy.save()
        failure = record.failure or Failure(None, "rolled back")
        state = "rolled_back" if failure.interrupted else "failed"
        suffix = "; rolled back to what ran before" if state == "rolled_back" else ""
        return Recovery(project_id, context, state, failure.step, failure.reason + suffix)

    @staticmethod
    def _interrupted_step(record: DeployRecord) -> str:
        begun = record.begun()
        return record.steps[begun[-1]].action if begun else "prepare"
