"""Proves the test-infrastructure fixtures (images, brokers, registry, names) work against the real services."""
from __future__ import annotations

import queue
import socket
import uuid

import docker
import docker.errors
import pytest
import requests

from tests.support.infra import (
    LOOPBACK,
    SESSION_LABELS,
    UniqueNames,
    build_busybox_variant,
    close_mqtt,
    connect_mqtt,
    free_port,
    image_exists,
    subscribe_and_wait,
    wait_until,
)


def _topic(leaf: str) -> str:
    return f"fleet-test/{uuid.uuid4().hex[:8]}/{leaf}"


def _inbox() -> tuple[queue.Queue, object]:
    messages: queue.Queue = queue.Queue()
    return messages, lambda _client, _userdata, message: messages.put(message)


def _health(container) -> str | None:
    container.reload()
    return container.attrs["State"].get("Health", {}).get("Status")


def test_free_port_can_be_bound_on_loopback():
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))


def test_busybox_image_runs_echo(docker_client, busybox_image, unique_name):
    output = docker_client.containers.run(
        busybox_image, ["echo", "hello fleet"], name=unique_name("echo"), remove=True
    )
    assert output == b"hello fleet\n"


def test_busybox_variant_has_its_own_command_environment_and_passing_healthcheck(docker_client, unique_name):
    ref = build_busybox_variant(
        docker_client,
        unique_name.image("web", "v2"),
        cmd=["sh", "-c", "echo greeting=$GREETING; exec sleep 60"],
        healthcheck="test -x /bin/sh",
        env={"GREETING": "hello v2"},
    )
    container = docker_client.containers.run(ref, name=unique_name("web"), detach=True)
    wait_until(lambda: _health(container) == "healthy", timeout=30, what="the variant to turn healthy")
    assert b"greeting=hello v2" in container.logs()


def test_busybox_variant_with_a_failing_healthcheck_turns_unhealthy(docker_client, unique_name):
    ref = build_busybox_variant(
        docker_client, unique_name.image("web", "bad"), cmd="exec sleep 60", healthcheck="false"
    )
    container = docker_client.containers.run(ref, name=unique_name("web"), detach=True)
    wait_until(lambda: _health(container) == "unhealthy", timeout=30, what="the variant to turn unhealthy")


def test_two_variants_built_alike_are_distinct_images(docker_client, unique_name):
    v1 = build_busybox_variant(docker_client, unique_name.image("app", "v1"))
    v2 = build_busybox_variant(docker_client, unique_name.image("app", "v2"))
    assert docker_client.images.get(v1).id != docker_client.images.get(v2).id


def test_broker_delivers_a_published_message_to_a_subscriber(broker):
    assert broker.url == f"mqtt://{LOOPBACK}:{broker.port}"
    topic = _topic("round-trip")
    messages, on_message = _inbox()
    subscriber, _ = connect_mqtt(broker.host, broker.port, on_message=on_message)
    publisher, _ = connect_mqtt(broker.host, broker.port)
    try:
        subscribe_and_wait(subscriber, topic, qos=1)
        publisher.publish(topic, b"ping", qos=1).wait_for_publish(timeout=5)
        message = messages.get(timeout=5)
    finally:
        close_mqtt(subscriber)
        close_mqtt(publisher)
    assert (message.topic, message.payload, message.qos) == (topic, b"ping", 1)


def test_restartable_broker_keeps_retained_messages_and_persistent_sessions(restartable_broker):
    broker = restartable_broker
    retained_topic, queued_topic = _topic("status"), _topic("commands")
    session_id = f"fleet-test-session-{uuid.uuid4().hex[:8]}"

    # Mosquitto 2.0.11 writes a v5 session to its persistence file only if the
    # client connected with clean_start=False; clean_start=True plus a session
    # expiry keeps the session across reconnects but not across a restart.
    device, _ = connect_mqtt(
        broker.host, broker.port, client_id=session_id, clean_start=False, session_expiry=3600
    )
    subscribe_and_wait(device, queued_topic, qos=1)
    close_mqtt(device)
    publisher, _ = connect_mqtt(broker.host, broker.port)
    publisher.publish(retained_topic, b"online", qos=1, retain=True).wait_for_publish(timeout=5)
    publisher.publish(queued_topic, b"deploy 7", qos=1).wait_for_publish(timeout=5)
    close_mqtt(publisher)

    broker.stop()
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=2).close()
    broker.start()

    reader_inbox, on_reader_message = _inbox()
    reader, _ = connect_mqtt(broker.host, broker.port, on_message=on_reader_message)
    device_inbox, on_device_message = _inbox()
    try:
        subscribe_and_wait(reader, retained_topic, qos=1)
        retained = reader_inbox.get(timeout=5)
        device, session_present = connect_mqtt(
            broker.host, broker.port, client_id=session_id, clean_start=False,
            session_expiry=3600, on_message=on_device_message,
        )
        queued = device_inbox.get(timeout=5)
        close_mqtt(device)
    finally:
        close_mqtt(reader)
    assert (retained.payload, retained.retain) == (b"online", True)
    assert session_present
    assert (queued.topic, queued.payload) == (queued_topic, b"deploy 7")


def test_registry_push_and_pull_with_credentials(docker_client, busybox_image, registry, unique_name):
    repository = unique_name("app")
    remote = registry.push(docker_client, busybox_image, repository, "v1")
    pushed_id = docker_client.images.get(remote).id
    docker_client.images.remove(remote)
    assert not image_exists(docker_client, remote)

    pulled = docker_client.images.pull(f"{registry.url}/{repository}", tag="v1", auth_config=registry.auth_config)

    assert pulled.id == pushed_id


def test_registry_refuses_a_wrong_password(docker_client, busybox_image, registry, unique_name):
    repository = unique_name("app")
    registry.push(docker_client, busybox_image, repository, "v1")
    wrong = {"username": registry.username, "password": "not-the-password"}

    with pytest.raises(docker.errors.APIError):
        docker_client.login(registry=registry.url, reauth=True, **wrong)
    with pytest.raises(docker.errors.APIError):
        docker_client.images.pull(f"{registry.url}/{repository}", tag="v1", auth_config=wrong)
    assert requests.get(f"http://{registry.url}/v2/", timeout=5).status_code == 401


def test_unique_names_remove_what_they_named_and_nothing_else(docker_client, busybox_image):
    names = UniqueNames("test_cleanup")
    named = names("stack")
    docker_client.containers.create(busybox_image, name=f"{named}_web_1")
    image = build_busybox_variant(docker_client, names.image("img"))
    bystander = docker_client.containers.create(
        busybox_image, name=f"fleet-test-bystander-{uuid.uuid4().hex[:8]}", labels=SESSION_LABELS
    )
    try:
        names.cleanup(docker_client)
        assert docker_client.containers.list(all=True, filters={"name": named}) == []
        assert not image_exists(docker_client, image)
        bystander.reload()
    finally:
        bystander.remove(force=True)
