"""The deploy engine against the real Docker engine and a real private registry: success, every fault, rollback."""
import threading
import uuid

import pytest

from fleet_device.deploy import OLD_SUFFIX, DeployError, Deployer, backup_path
from tests.support.deploy import SERVE, TRUSTING, message, owned_containers, release, spec, workload
from tests.support.infra import image_exists
from tests.support.stack import remove_agent_containers

pytestmark = pytest.mark.slow
PROJECT = 41


@pytest.fixture
def deployer(docker_client, tmp_path):
    reports = []
    unit_id = str(uuid.uuid4())
    engine = Deployer(unit_id, tmp_path / "state", client=docker_client, settle_seconds=0.6, health_timeout=20,
                      stop_timeout=2, report=lambda state, step=None, detail="": reports.append(state), policy=TRUSTING)
    engine.reports = reports
    yield engine
    remove_agent_containers(docker_client, [unit_id])


def deploy(deployer, project_id, doc, registries=None, previous=None):
    registries = registries or {}
    try:
        return deployer.apply(project_id, doc, registries, previous=previous,
                              context=message(project_id, doc, registries.values()))
    finally:
        deployer.forget(project_id)  # as the agent does once it recorded the outcome


def fail(deployer, project_id, doc, registries=None, previous=None) -> DeployError:
    with pytest.raises(DeployError) as raised:
        deploy(deployer, project_id, doc, registries, previous)
    return raised.value


@pytest.fixture
def running_v1(docker_client, deployer, unique_name):
    """Release 1 of the project, deployed and running: (name, release, container id)."""
    name = unique_name("svc")
    v1 = release(1, spec(name, workload(docker_client, unique_name, tag="v1")))
    deploy(deployer, PROJECT, v1)
    return name, v1, docker_client.containers.get(name).id


def assert_still_on_v1(docker_client, deployer, running_v1):
    name, v1, container_id = running_v1
    owned = owned_containers(docker_client, deployer.unit_id, PROJECT)
    assert list(owned) == [name], owned
    container = owned[name]
    assert container.id == container_id and container.status == "running"
    assert container.labels["fleet.release"] == "1"
    assert deployer.journal.load(PROJECT) is None


def test_a_new_release_replaces_the_old_one_reports_progress_and_removes_old_images(
    docker_client, deployer, running_v1, unique_name
):
    name, v1, old_id = running_v1
    base = workload(docker_client, unique_name, "base", tag="base")
    v2_ref = workload(docker_client, unique_name, "app2", tag="v2")
    v2 = release(2, spec(name, v2_ref, required_tags=["base"]))
    v2["containers"][0]["image"] = v2_ref.rsplit(":", 1)[0]
    # The required tag is another tag of the same repository.
    docker_client.images.get(base).tag(v2["containers"][0]["image"], "base")
    deployer.reports.clear()

    deploy(deployer, PROJECT, v2, previous=v1)

    owned = owned_containers(docker_client, deployer.unit_id, PROJECT)
    assert list(owned) == [name] and owned[name].id != old_id and owned[name].labels["fleet.release"] == "2"
    assert owned[name].status == "running"
    assert deployer.reports == ["stopping", "starting", "verifying"]
    v1_ref = f"{v1['containers'][0]['image']}:{v1['containers'][0]['tag']}"
    assert not image_exists(docker_client, v1_ref)
    assert image_exists(docker_client, v2_ref) and image_exists(docker_client, v2["containers"][0]["image"] + ":base")
    assert deployer.journal.load(PROJECT) is None


def test_reapplying_the_running_release_changes_nothing(docker_client, deployer, running_v1):
    name, v1, container_id = running_v1
    assert deploy(deployer, PROJECT, v1) == []
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_a_private_registry_image_is_pulled_with_its_required_tag_after_logging_in(
    docker_client, deployer, registry, unique_name
):
    local = workload(docker_client, unique_name, "private", tag="v1")
    repository = local.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    registry.push(docker_client, local, repository, "base")
    registry.push(docker_client, local, repository, "v1")
    for tag in ("base", "v1"):
        docker_client.images.remove(registry.ref(repository, tag))
    name = unique_name("private")
    registries = {5: {"id": 5, "url": f"http://{registry.url}", "username": registry.username,
                      "password": registry.password}}
    doc = release(3, {**spec(name, f"{repository}:v1"), "registry": 5, "required_tags": ["base"]})

    deploy(deployer, PROJECT, doc, registries)

    container = docker_client.containers.get(name)
    assert container.status == "running" and container.attrs["Config"]["Image"] == registry.ref(repository, "v1")
    assert image_exists(docker_client, registry.ref(repository, "base"))
    assert deployer.reports[:1] == ["pulling"]


def test_a_wrong_registry_password_fails_at_login_and_changes_nothing(
    docker_client, deployer, running_v1, registry, unique_name
):
    name, v1, _ = running_v1
    registries = {5: {"id": 5, "url": registry.url, "username": registry.username, "password": "wrong"}}
    doc = release(2, {**spec(name, "app:v2"), "registry": 5})
    error = fail(deployer, PROJECT, doc, registries, previous=v1)
    assert error.step == "login" and registry.url in error.reason and registry.username in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_an_image_missing_from_the_registry_fails_the_pull_and_changes_nothing(
    docker_client, deployer, running_v1, registry
):
    name, v1, _ = running_v1
    registries = {5: {"id": 5, "url": registry.url, "username": registry.username, "password": registry.password}}
    error = fail(deployer, PROJECT, release(2, {**spec(name, "nothing-here:v2"), "registry": 5}), registries, v1)
    assert error.step == "pull" and "nothing-here:v2" in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_a_registry_that_is_down_fails_the_deploy_and_changes_nothing(docker_client, deployer, running_v1):
    from tests.support.infra import free_port

    name, v1, _ = running_v1
    registries = {5: {"id": 5, "url": f"127.0.0.1:{free_port()}", "username": "u", "password": "p"}}
    error = fail(deployer, PROJECT, release(2, {**spec(name, "app:v2"), "registry": 5}), registries, v1)
    assert error.step == "login" and "refused" in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_a_container_that_exits_at_once_is_rolled_back(docker_client, deployer, running_v1, unique_name):
    name, v1, _ = running_v1
    broken = workload(docker_client, unique_name, "broken", cmd=["sh", "-c", "echo cannot start; exit 3"])
    error = fail(deployer, PROJECT, release(2, spec(name, broken)), previous=v1)
    assert error.step == "verify" and "exit code 3" in error.reason and "cannot start" in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)
    assert not any(n.endswith(OLD_SUFFIX) for n in owned_containers(docker_client, deployer.unit_id))


def test_a_container_started_again_between_two_looks_of_the_verification_is_rolled_back(
        docker_client, deployer, running_v1, unique_name, monkeypatch):
    """As an engine restart can: no restart counted, and running again by the next look."""
    name, v1, _ = running_v1
    verifying, looks, find = threading.Event(), [], deployer.engine.find
    deployer.on_step = lambda step, when: step.action == "verify" and when == "started" and verifying.set()

    def find_restarting_before_the_second_look(container_name):
        if verifying.is_set() and container_name == name:
            looks.append(container_name)
            if len(looks) == 2:  # restarted by the real engine, and started again before this look
                docker_client.containers.get(container_name).restart(timeout=0)
        return find(container_name)

    monkeypatch.setattr(deployer.engine, "find", find_restarting_before_the_second_look)
    error = fail(deployer, PROJECT, release(2, spec(name, workload(docker_client, unique_name, tag="v2"))), previous=v1)
    assert len(looks) >= 2 and error.step == "verify" and "started again" in error.reason, error
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_a_failing_healthcheck_is_rolled_back(docker_client, deployer, running_v1, unique_name):
    name, v1, _ = running_v1
    sick = workload(docker_client, unique_name, "sick", healthcheck="echo broken; exit 1")
    error = fail(deployer, PROJECT, release(2, spec(name, sick)), previous=v1)
    assert error.step == "verify" and "unhealthy" in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)


def test_a_healthcheck_must_pass_before_the_deploy_succeeds(docker_client, deployer, running_v1, unique_name):
    name, v1, _ = running_v1
    healthy = workload(docker_client, unique_name, "healthy",
                       healthcheck={"test": "test -f /tmp/ready", "interval": 1, "retries": 10},
                       cmd=["sh", "-c", "trap 'exit 0' TERM; sleep 2; touch /tmp/ready; sleep 3600 & wait"])
    deploy(deployer, PROJECT, release(2, spec(name, healthy)), previous=v1)
    assert docker_client.containers.get(name).attrs["State"]["Health"]["Status"] == "healthy"


def test_a_name_held_by_an_unmanaged_container_fails_and_touches_neither(
    docker_client, deployer, running_v1, unique_name, busybox_image
):
    name, v1, _ = running_v1
    squatter = unique_name("squatter")
    docker_client.containers.create(busybox_image, ["sleep", "60"], name=squatter)
    doc = release(2, spec(name, v1["containers"][0]["image"] + ":v1"), spec(squatter, busybox_image))
    error = fail(deployer, PROJECT, doc, previous=v1)
    assert error.step == "plan" and squatter in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)
    assert docker_client.containers.get(squatter).status == "created"


def test_a_bind_path_that_cannot_be_created_is_rolled_back(docker_client, deployer, running_v1, tmp_path):
    name, v1, _ = running_v1
    (tmp_path / "a-file").write_text("not a directory")
    doc = release(2, spec(name, v1["containers"][0]["image"] + ":v1"))
    doc["containers"][0]["startup_parameters"]["binds"] = [f"{tmp_path / 'a-file' / 'data'}:/data"]
    error = fail(deployer, PROJECT, doc, previous=v1)
    assert error.step == "start" and "a-file" in error.reason
    assert_still_on_v1(docker_client, deployer, running_v1)


def _with_data(doc, data_dir, purge=True):
    doc["containers"][0]["purge_data"] = purge
    doc["containers"][0]["startup_parameters"]["binds"] = [f"{data_dir}:/data"]
    return doc


def test_purge_data_empties_the_bind_directory_and_drops_the_backup(docker_client, deployer, unique_name, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "old.db").write_text("old")
    name = unique_name("db")
    image = workload(docker_client, unique_name, "db")
    deploy(deployer, PROJECT, _with_data(release(1, spec(name, image)), data, purge=False))
    writer = workload(docker_client, unique_name, "writer",
                      cmd=["sh", "-c", "ls /data > /data/seen; trap 'exit 0' TERM; sleep 3600 & wait"])

    deploy(deployer, PROJECT, _with_data(release(2, spec(name, writer)), data))

    assert sorted(p.name for p in data.iterdir()) == ["seen"]
    assert (data / "seen").read_text() == "seen\n"  # the new container started on an empty directory
    assert not backup_path(str(data), PROJECT).exists()


def test_purge_data_is_restored_when_the_deploy_fails(docker_client, deployer, unique_name, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "keep.db").write_text("precious")
    name = unique_name("db")
    deploy(deployer, PROJECT, _with_data(release(1, spec(name, workload(docker_client, unique_name, "db"))), data, False))
    scribbler = workload(docker_client, unique_name, "scribbler", cmd=["sh", "-c", "echo junk > /data/junk; exit 1"])

    error = fail(deployer, PROJECT, _with_data(release(2, spec(name, scribbler)), data))

    assert error.step == "verify"
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == ["sub", "sub/keep.db"]
    assert (data / "sub" / "keep.db").read_text() == "precious"
    assert not backup_path(str(data), PROJECT).exists()
    assert docker_client.containers.get(name).labels["fleet.release"] == "1"


def test_initial_containers_are_removed_on_success_and_restarted_on_failure(
    docker_client, deployer, unique_name, busybox_image
):
    legacy, bystander = unique_name("legacy"), unique_name("bystander")
    for container_name in (legacy, bystander):
        docker_client.containers.run(busybox_image, SERVE, name=container_name, detach=True,
                                     network_mode="none")
    broken = workload(docker_client, unique_name, "broken", cmd=["false"])
    name = unique_name("svc")

    fail(deployer, PROJECT, release(1, spec(name, broken), remove_containers=[legacy]))
    assert docker_client.containers.get(legacy).status == "running"

    good = workload(docker_client, unique_name, "good")
    deploy(deployer, PROJECT, release(2, spec(name, good), remove_containers=[legacy]))
    assert legacy not in {c.name for c in docker_client.containers.list(all=True)}
    assert docker_client.containers.get(bystander).status == "running"


def test_a_tombstone_removes_only_its_projects_containers(docker_client, deployer, unique_name):
    image = workload(docker_client, unique_name, "multi")
    first, second = unique_name("first"), unique_name("second")
    deploy(deployer, PROJECT, release(1, spec(first, image)))
    deploy(deployer, PROJECT + 1, release(2, spec(second, image)))

    deploy(deployer, PROJECT, None, previous=release(1, spec(first, image)))

    owned = owned_containers(docker_client, deployer.unit_id)
    assert list(owned) == [second] and owned[second].status == "running"
    # The tombstone prunes the project's image, but the engine keeps it while a container uses it.
    assert image_exists(docker_client, image)
