"""The messaging floor knows no feature: it records reports and publishes releases with what the app hands it."""
from __future__ import annotations

import pytest

import fleet_wire as wire
from fleet_server.extensions import db
from fleet_server.messaging import ingest, outbox
from fleet_server.messaging.mqtt import Request, request_properties
from tests.support.stack import add_release_for_new_devices


def test_a_feature_can_register_only_a_kind_of_report_devices_send():
    with pytest.raises(ValueError, match="'firmware'"):
        ingest.register("firmware", lambda device, message: None)
    with pytest.raises(ValueError, match="'firmware'"):
        ingest.register_batch("firmware", object)


def test_a_batch_recorder_gets_the_batch_s_reports_of_its_kind_together(app):
    from fleet_server.deployments.reports import DeploymentReports

    made, recorded, stored = [], [], []

    class Recorder:
        def __init__(self, reports):
            made.append([str(report.release_id) for _device, report in reports])

        def record(self, device, report):
            recorded.append(device.unit_id)

        def store(self):
            stored.append(True)

    try:
        ingest.register_batch("deployments", Recorder)
        with app.app_context():
            fleet = add_release_for_new_devices(2)
            report = {"project_id": fleet["project"], "release_id": fleet["release"], "version_hash": "0badc0de",
                      "state": "queued", "ts": 1700000000.0}
            payload = wire.encode(wire.from_builtins(wire.DeploymentReport, report))
            reasons = ingest.store_batch([(wire.device_topic(unit_id, "deployments"), payload)
                                          for unit_id in fleet["units"]])
    finally:
        ingest.register_batch("deployments", DeploymentReports)
    assert reasons == [None, None]
    assert made == [[str(fleet["release"])] * 2]  # one recorder for the batch, made from both reports
    assert recorded == fleet["units"] and stored == [True]


def test_a_report_goes_to_the_recorder_its_kind_is_registered_with(app):
    recorded = []
    try:
        ingest.register("results", lambda device, message: recorded.append((device.unit_id, message)))
        with app.app_context():
            unit_id = add_release_for_new_devices(1)["units"][0]
            command_id = "734c361a-ba56-472a-a891-ee2af1a80570"
            payload = wire.encode(wire.from_builtins(
                wire.CommandResult, {"id": command_id, "state": "running", "started_at": 1.0, "ts": 1.0}))
            assert ingest.handle_message(wire.device_topic(unit_id, "results"), payload)
    finally:
        from fleet_server.commands.service import record_result
        ingest.register("results", record_result)
    assert [(unit, str(message.id)) for unit, message in recorded] == [(unit_id, command_id)]


def test_a_report_of_a_kind_nothing_records_is_rejected_naming_the_kind(app):
    from fleet_server.logbook.service import record_telemetry

    try:
        ingest.register("telemetry", None)
        with app.app_context():
            unit_id = add_release_for_new_devices(1)["units"][0]
            payload = wire.encode(wire.from_builtins(wire.TelemetryBatch, {"batch_id": "0" * 32, "readings": [
                {"field": "t", "type": "int", "value": 1, "ts": 1700000000.0}]}))
            reasons = ingest.store_batch([(wire.device_topic(unit_id, "telemetry"), payload)])
    finally:
        ingest.register("telemetry", record_telemetry)
    assert reasons == ["nothing records telemetry reports on this server"]


def test_a_release_topic_carries_what_the_handed_builder_gives(app):
    outbox.init_app(app, release_contents=lambda release: {
        "release": wire.ReleaseSpec(id=release.id, version="handed", version_hash="0badc0de", containers=[],
                                    remove_containers=[]),
        "registries": []})
    with app.app_context():
        fleet = add_release_for_new_devices(2)
        topics = [(unit_id, fleet["project"]) for unit_id in fleet["units"]] + [("gone", fleet["project"])]
        messages = outbox.messages_for(topics, seq=7)
        db.session.rollback()
    document = wire.decode(wire.ReleaseMessage, messages[topics[0]])
    assert document.seq == 7 and document.release.version == "handed"
    assert messages[topics[1]] is messages[topics[0]]  # one document per release, however many devices
    assert messages[topics[2]] == b""  # a device no longer known: its retained topic is cleared


def test_the_broker_link_builds_a_requests_mqtt_v5_properties_from_plain_values():
    properties = request_properties(Request("devices/u/results", "734c361a", 0.2))
    assert properties.ResponseTopic == "devices/u/results"
    assert properties.CorrelationData == b"734c361a"
    assert properties.MessageExpiryInterval == 1  # never 0, which would mean "no expiry"
    assert request_properties(None) is None
