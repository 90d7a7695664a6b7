"""Unit tests of the pure deploy plan: current device state + target release → ordered steps."""
import pytest

from fleet_device.deploy import (
    COMMIT, OLD_SUFFIX, DeployError, DeviceState, Running, Stop, backup_path, image_reference, plan, purge_paths,
    registry_host, release_image_refs,
)

PROJECT = 7
REGISTRIES = {1: {"id": 1, "url": "https://registry.example:5000/", "username": "u", "password": "p"},
              2: {"id": 2, "url": "public.example", "username": "", "password": ""}}


def container(name="app", image="acme/app", tag="v2", **extra):
    return {"name": name, "image": image, "tag": tag, "required_tags": [], "startup_parameters": {},
            "purge_data": False, "registry": None, "fully_qualified_name": f"deployment-{name}-{PROJECT}", **extra}


def release(*containers, id=12, version_hash="0000beef", remove_containers=()):
    return {"id": id, "version": "2", "version_hash": version_hash, "containers": list(containers) or [container()],
            "remove_containers": list(remove_containers)}


def owned(name="deployment-app-7", release_id="11", version_hash="0000cafe", running=True, image="acme/app:v1"):
    return Running(name, str(PROJECT), release_id, version_hash, running, image)


def actions(steps):
    return [(s.action, s.target) for s in steps]


def test_a_release_that_already_runs_plans_nothing():
    state = DeviceState((owned(release_id="12", version_hash="0000beef", image="acme/app:v2"),), frozenset({"acme/app:v2"}))
    assert plan(PROJECT, release(), state, {}) == []


def test_a_stopped_container_of_the_running_release_is_redeployed():
    state = DeviceState((owned(release_id="12", version_hash="0000beef", running=False),), frozenset({"acme/app:v2"}))
    assert ("start", "deployment-app-7") in actions(plan(PROJECT, release(), state, {}))


def test_a_first_release_pulls_starts_and_verifies():
    steps = plan(PROJECT, release(), DeviceState(), {})
    assert actions(steps) == [("pull", "acme/app:v2"), ("start", "deployment-app-7"), ("verify", "")]
    assert steps[1].image == "acme/app:v2" and steps[2].names == ("deployment-app-7",)


def test_required_tags_are_pulled_before_the_tag_and_present_images_are_not_pulled():
    target = release(container(required_tags=["base", "v2"]))
    steps = plan(PROJECT, target, DeviceState(images=frozenset({"acme/app:base"})), {})
    assert [s.target for s in steps if s.action == "pull"] == ["acme/app:v2"]
    assert release_image_refs(target, {}) == ["acme/app:base", "acme/app:v2"]


def test_the_previous_release_is_stopped_renamed_and_removed_only_after_verification():
    state = DeviceState((owned(),), frozenset({"acme/app:v1", "acme/app:v2"}), previous=release(id=11, version_hash="0000cafe"))
    steps = plan(PROJECT, release(), state, {})
    assert actions(steps) == [
        ("stop", "deployment-app-7"), ("start", "deployment-app-7"), ("verify", ""),
        ("remove", "deployment-app-7" + OLD_SUFFIX), ("prune", "acme/app:v1"),
    ]
    assert steps[0].rename_to == "deployment-app-7" + OLD_SUFFIX
    assert [s.phase for s in steps][-2:] == [COMMIT, COMMIT]


def test_initial_containers_are_stopped_and_removed_but_other_unlabelled_ones_are_left_alone():
    state = DeviceState((Running("legacy"), Running("bystander"), Running("stopped-legacy", running=False)))
    steps = plan(PROJECT, release(remove_containers=["legacy", "stopped-legacy", "absent"]), state, {})
    stops = [s for s in steps if s.action == "stop"]
    assert [(s.target, s.initial, s.rename_to) for s in stops] == [("legacy", True, None), ("stopped-legacy", True, None)]
    assert ("remove", "legacy") in actions(steps) and ("remove", "stopped-legacy") in actions(steps)
    assert all("bystander" not in (s.target, getattr(s, "rename_to", None)) for s in steps)


def test_an_initial_container_holding_a_wanted_name_is_renamed_out_of_the_way():
    state = DeviceState((Running("deployment-app-7"),))
    steps = plan(PROJECT, release(remove_containers=["deployment-app-7"]), state, {})
    assert steps[1] == Stop("deployment-app-7", rename_to="deployment-app-7" + OLD_SUFFIX, initial=True)
    assert ("remove", "deployment-app-7" + OLD_SUFFIX) in actions(steps)


def test_a_remove_containers_entry_never_touches_another_projects_container():
    state = DeviceState((Running("other", project="8"),))
    assert all(s.target != "other" for s in plan(PROJECT, release(remove_containers=["other"]), state, {}))


def test_a_wanted_name_held_by_an_unmanaged_container_is_a_conflict_before_anything_changes():
    state = DeviceState((Running("deployment-app-7"),))
    with pytest.raises(DeployError) as raised:
        plan(PROJECT, release(), state, {})
    assert raised.value.step == "plan" and "deployment-app-7" in raised.value.reason


def test_a_wanted_name_held_by_another_project_is_a_conflict():
    with pytest.raises(DeployError, match="not managed by project 7"):
        plan(PROJECT, release(), DeviceState((Running("deployment-app-7", project="9"),)), {})


def test_a_container_naming_an_unknown_registry_is_refused():
    with pytest.raises(DeployError, match="registry 3"):
        plan(PROJECT, release(container(registry=3)), DeviceState(), REGISTRIES)


def test_private_registry_images_are_logged_in_to_once_then_pulled_by_registry_reference():
    target = release(container("a", registry=1), container("b", image="acme/b", registry=1), container("c", registry=2))
    steps = plan(PROJECT, target, DeviceState(), REGISTRIES)
    assert actions(steps)[:4] == [("login", "registry.example:5000"), ("pull", "registry.example:5000/acme/app:v2"),
                                  ("pull", "registry.example:5000/acme/b:v2"), ("pull", "public.example/acme/app:v2")]


def test_purge_data_backs_up_writable_binds_after_the_stop_and_drops_the_backup_on_commit():
    target = release(container(purge_data=True, startup_parameters={"binds": ["/srv/data:/data", "/etc/conf:/conf:ro",
                                                                              "/srv/logs:/logs:rw"]}))
    steps = plan(PROJECT, target, DeviceState((owned(),)), {})
    order = actions(steps)
    assert order.index(("stop", "deployment-app-7")) < order.index(("purge", "/srv/data")) < order.index(
        ("start", "deployment-app-7"))
    assert ("purge", "/etc/conf") not in order and ("purge", "/srv/logs") in order
    assert ("drop_backup", "/srv/data") in order and ("drop_backup", "/srv/logs") in order
    assert purge_paths(release(container())) == []


def test_images_another_project_needs_or_the_new_release_uses_are_never_pruned():
    state = DeviceState((owned(image="acme/app:base"),), frozenset({"acme/app:v1", "acme/app:base", "shared:1"}),
                        previous=release(container(tag="v1", required_tags=["base"], image="acme/app"),
                                         container("s", image="shared", tag="1"), id=11),
                        needed_elsewhere=frozenset({"shared:1"}))
    target = release(container(tag="v2", required_tags=["base"]))
    prunes = [s.target for s in plan(PROJECT, target, state, {}) if s.action == "prune"]
    assert prunes == ["acme/app:v1"]


def test_images_no_longer_on_the_engine_are_not_pruned():
    state = DeviceState((owned(),), frozenset(), previous=release(id=11))
    assert [s for s in plan(PROJECT, release(container(tag="v3")), state, {}) if s.action == "prune"] == []


def test_a_tombstone_removes_the_projects_containers_and_their_images():
    state = DeviceState((owned(), Running("unrelated"), Running("x", project="8")), frozenset({"acme/app:v1"}))
    assert actions(plan(PROJECT, None, state, {})) == [("remove", "deployment-app-7"), ("prune", "acme/app:v1")]


def test_a_tombstone_for_a_project_with_nothing_running_plans_nothing():
    assert plan(PROJECT, None, DeviceState((Running("unrelated"),)), {}) == []


def test_leftover_renamed_containers_are_renamed_before_the_name_they_would_take():
    state = DeviceState((owned(), owned(name="deployment-app-7" + OLD_SUFFIX)))
    stops = [s.target for s in plan(PROJECT, release(), state, {}) if s.action == "stop"]
    assert stops == ["deployment-app-7" + OLD_SUFFIX, "deployment-app-7"]


def test_a_container_dropped_from_the_release_is_stopped_and_removed():
    state = DeviceState((owned(), owned(name="deployment-gone-7")))
    steps = actions(plan(PROJECT, release(), state, {}))
    assert ("stop", "deployment-gone-7") in steps and ("remove", "deployment-gone-7" + OLD_SUFFIX) in steps


def test_registry_hosts_and_references_are_derived_from_the_url():
    assert registry_host("https://r.example:5000/v2/") == "r.example:5000"
    assert registry_host("127.0.0.1:5000") == "127.0.0.1:5000"
    assert image_reference({"image": "127.0.0.1:5000/app", "registry": 1}, {1: {"url": "127.0.0.1:5000"}}) == \
        "127.0.0.1:5000/app"
    assert backup_path("/srv/data", 7).name == ".data.fleet-backup-7"


def test_every_step_type_has_an_action_and_those_changing_the_device_an_undo():
    from fleet_device.deploy.executor import ACTIONS
    from fleet_device.deploy.steps import CHANGE, STEP_TYPES

    assert set(ACTIONS) == set(STEP_TYPES.values())
    assert all(ACTIONS[kind].undo is not None for kind in STEP_TYPES.values() if kind.phase == CHANGE)
