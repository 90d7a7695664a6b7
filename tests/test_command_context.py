"""Built-in commands run on a narrow context (unit id, Docker client, release queue, scope), with no agent behind it."""
import uuid

from fleet_device import commands
from fleet_device.commands import CommandContext, ContainerScope
from fleet_device.state import ReleaseQueue
from tests.support.deploy import SERVE
from tests.support.stack import remove_agent_containers


def test_grains_and_docker_ps_answer_from_the_context_alone(docker_client, busybox_image, unique_name, tmp_path):
    unit_id = str(uuid.uuid4())
    releases = ReleaseQueue(tmp_path)
    releases.mark_applied({"project_id": 3, "release": {"id": 9, "version": "9.0", "version_hash": "0000beef"}},
                          succeeded=True)
    managed, bystander = unique_name("managed"), unique_name("bystander")
    docker_client.containers.run(busybox_image, SERVE, name=managed, detach=True, network_mode="none",
                                 labels={"fleet.unit_id": unit_id, "fleet.project": "3"})
    docker_client.containers.run(busybox_image, SERVE, name=bystander, detach=True, network_mode="none")
    made = []
    context = CommandContext(unit_id, docker=lambda: made.append(1) or docker_client, releases=releases)
    try:
        grains = commands.execute(context, "grains.items", [], {})
        assert grains["unit_id"] == unit_id and grains["engine"]["version"] and made
        assert grains["releases"] == {"3": {"id": 9, "version": "9.0", "version_hash": "0000beef"}}
        assert [c["name"] for c in commands.execute(context, "docker.ps", [], {})] == [managed]
        wider = CommandContext(unit_id, docker=lambda: docker_client,
                               container_scope=ContainerScope(names=frozenset({bystander})))
        assert sorted(c["name"] for c in commands.execute(wider, "docker.ps", [], {})) == sorted([managed, bystander])
    finally:
        remove_agent_containers(docker_client, [unit_id])
        docker_client.containers.get(bystander).remove(force=True)
