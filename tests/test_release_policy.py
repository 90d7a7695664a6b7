"""The release policy both sides apply: which parts of a release need trust, and the bind allow-list's edges."""
import pytest

from fleet_wire.release_policy import (
    DATA_ROOT, DEFAULT_BIND_ROOTS, LOCK_ROOT, ReleasePolicy, bind_allowed, describe, normalise, parse_bind_roots,
    violations,
)

STRICT = ReleasePolicy()


def release(*parameters, remove_containers=()):
    return {"containers": [{"name": f"c{i}", "startup_parameters": p} for i, p in enumerate(parameters)],
            "remove_containers": list(remove_containers)}


def fields(found):
    return [violation.field for violation in found]


def test_an_unprivileged_release_inside_the_data_root_needs_no_trust():
    body = release({"binds": [f"{DATA_ROOT}/app:/data", f"{LOCK_ROOT}:/locks:ro"], "network_mode": "bridge",
                    "privileged": False}, {"network_mode": "none"}, {})
    assert violations(body, STRICT) == []


@pytest.mark.parametrize("parameters, field", [
    ({"privileged": True}, "containers.1.startup_parameters.privileged"),
    ({"network_mode": "host"}, "containers.1.startup_parameters.network_mode"),
    ({"network_mode": "container:deployment-db-7"}, "containers.1.startup_parameters.network_mode"),
    ({"binds": [f"{DATA_ROOT}:/ok", "/:/host"]}, "containers.1.startup_parameters.binds.1"),
])
def test_each_part_that_needs_trust_is_named_by_its_field(parameters, field):
    found = violations(release({}, parameters), STRICT)
    assert fields(found) == [field]
    assert describe(found).startswith(field + ": ")


def test_removing_a_container_fleet_does_not_manage_is_named_by_its_position():
    body = release({}, remove_containers=["deployment-app-3", "legacy"])
    assert fields(violations(body, STRICT, unmanaged_removals=["legacy"])) == ["remove_containers.1"]


def test_every_violation_of_a_release_is_listed_in_its_order():
    body = release({"privileged": True, "network_mode": "host", "binds": ["/etc:/etc"]}, remove_containers=["x"])
    assert fields(violations(body, STRICT, ["x"])) == [
        "containers.0.startup_parameters.privileged", "containers.0.startup_parameters.network_mode",
        "containers.0.startup_parameters.binds.0", "remove_containers.0"]


def test_a_policy_that_allows_privilege_trusts_the_whole_release():
    body = release({"privileged": True, "network_mode": "host", "binds": ["/var/run/docker.sock:/s"]},
                   remove_containers=["x"])
    assert violations(body, ReleasePolicy(allow_privileged=True), ["x"]) == []


@pytest.mark.parametrize("host_path", [
    DATA_ROOT, DATA_ROOT + "/", DATA_ROOT + "/app", "//var//lib/fleet-device/data//app/", DATA_ROOT + "/./app",
    LOCK_ROOT, LOCK_ROOT + "/project-3",
])
def test_paths_inside_a_root_are_allowed_however_they_are_spelt(host_path):
    assert bind_allowed(host_path, DEFAULT_BIND_ROOTS)


@pytest.mark.parametrize("host_path", [
    "/var/lib/fleet-device/data-evil",  # a prefix that is not a path boundary
    "/var/lib/fleet-device/dataevil/x",
    "/var/lib/fleet-device",  # the parent of a root
    "/var/lib/fleet-device/data/../../../../etc",  # climbing out
    "/var/lib/fleet-device/data/..",
    "/", "//", "/home/balenaEngine/data", "/etc",
    "relative/data", "", "/var/lib/fleet-device/data/\x00x",
])
def test_paths_outside_every_root_are_refused(host_path):
    assert not bind_allowed(host_path, DEFAULT_BIND_ROOTS)


@pytest.mark.parametrize("host_path", [
    "/var/run/docker.sock", "/run/docker.sock", "//run//docker.sock/", "/run", "/var/run", "/var", "/",
    "/run/balena-engine.sock",
])
def test_the_engine_socket_is_never_inside_the_allow_list_even_under_a_root_of_slash(host_path):
    assert not bind_allowed(host_path, ("/",))
    assert "socket" in describe(violations(release({"binds": [f"{host_path or '/'}:/x"]}), ReleasePolicy(bind_roots=("/",))))


def test_a_root_of_slash_allows_anything_but_the_socket():
    assert bind_allowed("/home/balenaEngine/data", ("/",))


def test_a_symbolic_link_inside_a_root_that_leads_out_of_it_is_refused_when_links_are_followed():
    links = {"/var/lib/fleet-device/data/escape": "/etc", "/var/lib/fleet-device/data/sock": "/run"}

    def resolve(path):
        for link, target in links.items():
            if path == link or path.startswith(link + "/"):
                return target + path[len(link):]
        return path

    assert bind_allowed(f"{DATA_ROOT}/escape/shadow", DEFAULT_BIND_ROOTS)  # lexically inside
    assert not bind_allowed(f"{DATA_ROOT}/escape/shadow", DEFAULT_BIND_ROOTS, resolve)
    assert not bind_allowed(f"{DATA_ROOT}/sock", DEFAULT_BIND_ROOTS, resolve)
    assert bind_allowed(f"{DATA_ROOT}/app", DEFAULT_BIND_ROOTS, resolve)


def test_a_root_that_is_itself_a_link_still_holds_its_own_paths_when_links_are_followed():
    def resolve(path):
        return path.replace("/data", "/mnt/sd/data", 1) if path.startswith("/data") else path

    assert bind_allowed("/data/app", ("/data",), resolve)


def test_normalise_collapses_slashes_and_refuses_what_climbs():
    assert normalise("//a//b/./c/") == "/a/b/c"
    assert normalise("/") == "/"
    assert normalise("/a/../b") is None and normalise("a/b") is None and normalise(None) is None


@pytest.mark.parametrize("text, roots", [
    (None, DEFAULT_BIND_ROOTS),
    ("  ", DEFAULT_BIND_ROOTS),
    ("/srv/data", ("/srv/data",)),
    ("/srv/data/:/media//usb,/srv/data", ("/srv/data", "/media/usb")),
    ("/srv/a, /srv/b", ("/srv/a", "/srv/b")),
])
def test_bind_roots_are_read_from_colon_or_comma_separated_absolute_paths(text, roots):
    assert parse_bind_roots(text) == roots


@pytest.mark.parametrize("text, named", [
    ("srv/data", "'srv/data'"),
    ("/srv/../etc", "'/srv/../etc'"),
    ("/var/run/docker.sock", "socket"),
    (":,", "names no path"),
])
def test_bad_bind_roots_are_refused_with_one_line_naming_the_setting_and_the_entry(text, named):
    with pytest.raises(ValueError) as caught:
        parse_bind_roots(text, "FLEET_ALLOWED_BIND_ROOTS")
    message = str(caught.value)
    assert message.startswith("FLEET_ALLOWED_BIND_ROOTS: ") and named in message and "\n" not in message
