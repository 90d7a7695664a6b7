"""The logbook on a real database: batches stored through the ingest path, read back as AutoPi's logbook shows."""
import importlib.util
import json
import random
import struct
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import fleet_wire as wire
from fleet_server.messaging import ingest
from fleet_server.extensions import db
from fleet_server.logbook import service
from fleet_server.logbook.models import TelemetryBatch, TelemetryReading
from fleet_server.models import Device

READ = "/logbook/storage/read/"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def voltage(iso, value, field="obd.bat.voltage", kind="float"):
    return {"field": field, "type": kind, "ts": _epoch(iso), "value": value}


def position(iso, lat, lon):
    return {"field": "track.pos.loc", "type": "geo_point", "ts": _epoch(iso), "value": {"lat": lat, "lon": lon}}


@pytest.fixture
def device(client, auth):
    return client.post("/dongle/devices/", json={"name": "dongle"}, headers=auth).get_json()


@pytest.fixture
def send(app, device):
    """Deliver a batch through the worker's ingest path, as if it came from the device's topic."""

    def deliver(readings, batch_id=None, unit_id=None, dropped=0):
        batch = wire.from_builtins(wire.TelemetryBatch, {"batch_id": batch_id or uuid.uuid4().hex,
                                                          "dropped": dropped, "readings": readings})
        payload = wire.encode(batch)
        with app.app_context():
            return ingest.handle_message(wire.device_topic(unit_id or device["unit_id"], "telemetry"), payload)

    return deliver


def read(client, auth, device, **params):
    query = {"device_id": device["id"], "from_utc": "2020-07-09T10:00:00.000Z", "to_utc": "2020-07-09T11:00:00.000Z",
             **params}
    return client.get(READ, query_string=query, headers=auth)


def test_positions_come_back_in_autopis_shape(client, auth, device, send):
    assert send([
        position("2020-07-09T10:11:59.248421Z", 57.04697, 9.93808),
        position("2020-07-09T10:11:53.811839Z", 57.04699, 9.93909),
        position("2020-07-09T09:59:59.999999Z", 1.0, 1.0),  # before from_utc
        position("2020-07-09T11:00:00.000000Z", 2.0, 2.0),  # to_utc is excluded
    ])
    response = read(client, auth, device, field="track.pos.loc", field_type="geo_point")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == [
        {"ts": "2020-07-09T10:11:53.811839Z", "location": {"lat": 57.04699, "lon": 9.93909}},
        {"ts": "2020-07-09T10:11:59.248421Z", "location": {"lat": 57.04697, "lon": 9.93808}},
    ]


def test_battery_voltage_averaged_per_ten_minutes_comes_back_in_autopis_shape(client, auth, device, send):
    assert send([
        voltage("2020-07-09T10:03:37.566Z", 13.25),
        voltage("2020-07-09T10:03:41.415Z", 13.75),
        voltage("2020-07-09T10:13:45.378Z", 13.5),
        voltage("2020-07-09T10:17:02.250Z", 13.7),
        voltage("2020-07-09T10:05:00Z", 99.0, field="obd.speed"),  # another field
        voltage("2020-07-09T11:05:00Z", 99.0),  # outside the range
    ])
    response = read(client, auth, device, field="obd.bat.voltage", field_type="float", aggregation="avg",
                    interval="10m")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == [
        {"max_ts": 1594289021415, "ts": "2020-07-09T10:03:37.566Z", "value": 13.5},
        {"max_ts": 1594289822250, "ts": "2020-07-09T10:13:45.378Z", "value": 13.6},
    ]


def test_raw_numeric_readings_come_back_as_ts_and_value_in_time_order(client, auth, device, send):
    send([voltage("2020-07-09T10:20:00.5Z", 12.0), voltage("2020-07-09T10:10:00Z", 11.5)])
    body = read(client, auth, device, field="obd.bat.voltage", field_type="float").get_json()
    assert body == [{"ts": "2020-07-09T10:10:00.000000Z", "value": 11.5},
                    {"ts": "2020-07-09T10:20:00.500000Z", "value": 12.0}]


@pytest.mark.parametrize("aggregation, expected", [("MIN", [1, 10]), ("Max", [5, 30]), ("sum", [6, 40]),
                                                   ("AVG", [3.0, 20.0])])
def test_each_aggregation_is_computed_per_bucket_whatever_its_case(client, auth, device, send, aggregation, expected):
    send([voltage("2020-07-09T10:00:00Z", 1, "rpm", "int"), voltage("2020-07-09T10:00:09Z", 5, "rpm", "int"),
          voltage("2020-07-09T10:00:10Z", 10, "rpm", "int"), voltage("2020-07-09T10:00:19.999Z", 30, "rpm", "int")])
    body = read(client, auth, device, field="rpm", field_type="int", aggregation=aggregation, interval="10s").get_json()
    assert [entry["value"] for entry in body] == expected
    assert [entry["ts"] for entry in body] == ["2020-07-09T10:00:00.000Z", "2020-07-09T10:00:10.000Z"]
    assert [entry["max_ts"] for entry in body] == [1594288809000, 1594288819999]


def test_buckets_without_readings_are_left_out(client, auth, device, send):
    send([voltage("2020-07-09T10:00:01Z", 1.0), voltage("2020-07-09T12:30:00Z", 2.0)])
    body = read(client, auth, device, field="obd.bat.voltage", field_type="float", aggregation="max", interval="1h",
                to_utc="2020-07-10T00:00:00Z").get_json()
    assert [(e["ts"], e["value"]) for e in body] == [("2020-07-09T10:00:01.000Z", 1.0), ("2020-07-09T12:30:00.000Z", 2.0)]


def test_a_redelivered_batch_is_stored_once(app, client, auth, device, send):
    batch_id = uuid.uuid4().hex
    readings = [voltage("2020-07-09T10:00:01Z", 1.0), voltage("2020-07-09T10:00:02Z", 2.0)]
    assert send(readings, batch_id) and send(readings, batch_id)
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 2
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryBatch)) == 1


def test_the_dropped_counter_a_device_reports_is_kept_with_its_batch(app, device, send):
    send([voltage("2020-07-09T10:00:01Z", 1.0)], dropped=42)
    with app.app_context():
        assert db.session.scalars(db.select(TelemetryBatch.dropped)).one() == 42


def test_a_batch_with_one_bad_reading_is_rejected_whole(app, device):
    good = voltage("2020-07-09T10:00:01Z", 1.0)
    bad = {"field": "x", "type": "int", "ts": 1.0, "value": 1.5}
    payload = json.dumps({"v": 1, "batch_id": uuid.uuid4().hex, "readings": [good, bad]}).encode()
    with app.app_context():
        assert not ingest.handle_message(wire.device_topic(device["unit_id"], "telemetry"), payload)
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 0


def test_a_batch_on_the_topic_of_an_unknown_device_is_rejected(app, send):
    assert not send([voltage("2020-07-09T10:00:01Z", 1.0)], unit_id=str(uuid.uuid4()))
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 0


def test_readings_of_one_device_are_never_read_as_another_s(client, auth, device, send):
    other = client.post("/dongle/devices/", json={"name": "other"}, headers=auth).get_json()
    send([voltage("2020-07-09T10:00:01Z", 1.0)], unit_id=other["unit_id"])
    assert read(client, auth, device, field="obd.bat.voltage", field_type="float").get_json() == []
    assert len(read(client, auth, other, field="obd.bat.voltage", field_type="float").get_json()) == 1
    empty = read(client, auth, device, field="obd.bat.voltage", field_type="float", aggregation="avg", interval="10m")
    assert (empty.status_code, empty.get_json()) == (200, [])


def test_a_device_deleted_with_its_readings_is_unknown_to_the_logbook(client, auth, device, send):
    send([voltage("2020-07-09T10:00:01Z", 1.0)], unit_id=device["unit_id"])
    assert client.delete(f"/dongle/devices/{device['id']}/", headers=auth).status_code == 204
    for extra in ({}, {"aggregation": "max", "interval": "1h"}):
        response = read(client, auth, device, field="obd.bat.voltage", field_type="float", **extra)
        assert response.status_code == 400
        assert "device_id" in response.get_json()["errors"]


@pytest.mark.parametrize("params, field", [
    ({"device_id": "no-such-device"}, "device_id"),
    ({"device_id": "no-such-device", "aggregation": "avg", "interval": "10m"}, "device_id"),
    ({"from_utc": "2020-07-09T12:00:00Z"}, "from_utc"),
    ({"from_utc": "yesterday"}, "from_utc"),
    ({"to_utc": None}, "to_utc"),
    ({"field_type": "text"}, "field_type"),
    ({"field": None}, "field"),
    ({"aggregation": "median", "interval": "10m"}, "aggregation"),
    ({"aggregation": "avg"}, "interval"),
    ({"interval": "10m"}, "aggregation"),
    ({"aggregation": "avg", "interval": "10 minutes"}, "interval"),
    ({"aggregation": "avg", "interval": "0s"}, "interval"),
    ({"aggregation": "avg", "interval": "1s", "to_utc": "2020-07-10T10:00:00Z"}, "interval"),
    ({"aggregation": "avg", "interval": "1m", "field_type": "geo_point"}, "aggregation"),
    ({"colour": "red"}, "colour"),
])
def test_bad_parameters_get_400_naming_the_parameter(client, auth, device, params, field):
    query = {"device_id": device["id"], "field": "obd.bat.voltage", "field_type": "float",
             "from_utc": "2020-07-09T10:00:00Z", "to_utc": "2020-07-09T11:00:00Z", **params}
    response = client.get(READ, query_string={k: v for k, v in query.items() if v is not None}, headers=auth)
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["errors"], response.get_json()


def test_the_logbook_needs_a_token(client, device):
    assert client.get(READ, query_string={"device_id": device["id"]}).status_code == 401


# --- raw reads, whose JSON the database writes ----------------------------------------------

def _reference_json(entries) -> bytes:
    """How the logbook rendered a raw read in Python before the database wrote it: the bytes must not change."""
    def iso(ts_us):
        return (datetime(1970, 1, 1) + timedelta(microseconds=ts_us)).isoformat(timespec="microseconds") + "Z"
    return json.dumps([{"ts": iso(ts_us), key: value} for ts_us, key, value in entries],
                      separators=(",", ":")).encode()


def test_an_empty_range_reads_as_an_empty_list_for_numbers_and_positions(client, auth, device, send):
    send([voltage("2020-07-09T12:00:00Z", 1.0), position("2020-07-09T12:00:00Z", 1.0, 2.0)])
    for field, field_type in (("obd.bat.voltage", "float"), ("track.pos.loc", "geo_point")):
        response = read(client, auth, device, field=field, field_type=field_type)
        assert response.status_code == 200 and response.data == b"[]", response.data
    response = read(client, auth, device, field="obd.bat.voltage", field_type="float",
                    from_utc="2020-07-09T12:00:00Z", to_utc="2020-07-09T12:00:00Z")
    assert response.data == b"[]"


def test_timestamps_across_day_month_year_and_leap_day_boundaries_read_back_exactly(client, auth, device, send):
    moments = ["1970-01-01T00:00:00.000000", "2020-02-28T23:59:59.999999", "2020-02-29T00:00:00.000001",
               "2020-12-31T23:59:59.999999", "2021-01-01T00:00:00.000000", "2999-12-31T23:59:59.500000"]
    epoch = datetime(1970, 1, 1)
    ts_us = [(datetime.fromisoformat(m) - epoch) // timedelta(microseconds=1) for m in moments]
    send([{"field": "x", "type": "double", "ts": t / 1e6, "value": 1.5} for t in ts_us])
    response = read(client, auth, device, field="x", field_type="double", from_utc="1970-01-01T00:00:00Z",
                    to_utc="3000-01-01T00:00:00Z")
    assert response.data == _reference_json([(t, "value", 1.5) for t in ts_us])
    assert [e["ts"] for e in response.get_json()] == [m + "Z" for m in moments]


def test_a_timestamp_is_rounded_to_the_nearest_microsecond_even_across_midnight(client, auth, device, send):
    midnight = _epoch("2020-07-10T00:00:00Z")
    send([voltage("2020-07-09T23:00:00Z", 1.0) | {"ts": midnight - 0.0000003},  # 0.3 µs before: rounds up
          voltage("2020-07-09T23:00:00Z", 2.0) | {"ts": midnight + 0.0000012}])  # 1.2 µs after: rounds down
    body = read(client, auth, device, field="obd.bat.voltage", field_type="float", from_utc="2020-07-09T23:00:00Z",
                to_utc="2020-07-10T01:00:00Z").get_json()
    assert body == [{"ts": "2020-07-10T00:00:00.000000Z", "value": 1.0},
                    {"ts": "2020-07-10T00:00:00.000001Z", "value": 2.0}]


@pytest.mark.parametrize("kind, values", [
    ("double", [-273.15, 0.1 + 0.2, 1e16, 1e15 + 0.5, 123456789012345.6, 1.5e-07, 1e-05, 0.0001, -1e300, 5e-324,
                2.0 ** 0.5, 13.600000000000001, 0.0, -0.0]),
    ("long", [0, -1, 2 ** 53 + 1, -(2 ** 63), 2 ** 63 - 1]),
])
def test_negative_large_tiny_and_whole_values_read_back_exactly_as_python_prints_them(
        client, auth, device, send, kind, values):
    start_us = 1594288800 * 1_000_000
    send([{"field": "x", "type": kind, "ts": (start_us + i * 1_000_000) / 1e6, "value": value}
          for i, value in enumerate(values)])
    response = read(client, auth, device, field="x", field_type=kind)
    assert response.status_code == 200, response.get_json()
    # Raw values come from a double column: a whole number reads back as a float (`5.0`, `1e+20`).
    expected = [(start_us + i * 1_000_000, "value", float(value)) for i, value in enumerate(values)]
    assert response.data == _reference_json(expected)


def test_random_doubles_read_back_byte_for_byte_as_before(client, auth, device, send):
    generator = random.Random(7)
    values = [generator.uniform(-100, 100) for _ in range(300)]  # 16-17 significant digits
    values += [round(generator.uniform(-1e4, 1e4), 3) for _ in range(300)]  # what sensors send
    # Any bit pattern below 2.0, subnormals included: shortest round-trip digits are the hard case.
    values += [struct.unpack("<d", struct.pack("<Q", generator.getrandbits(62)))[0] for _ in range(300)]
    start_us = 1594288800 * 1_000_000
    send([{"field": "x", "type": "double", "ts": (start_us + i * 1000) / 1e6, "value": value}
          for i, value in enumerate(values)])
    response = read(client, auth, device, field="x", field_type="double")
    assert response.data == _reference_json([(start_us + i * 1000, "value", value) for i, value in enumerate(values)])


def test_positions_at_the_poles_and_the_date_line_read_back_exactly(client, auth, device, send):
    points = [(-90.0, 180.0), (90.0, -180.0), (1e-07, -0.000123), (57.04699, 9.93909), (0.0, 0.0)]
    start_us = 1594288800 * 1_000_000
    send([{"field": "track.pos.loc", "type": "geo_point", "ts": (start_us + i * 1_000_000) / 1e6,
           "value": {"lat": lat, "lon": lon}} for i, (lat, lon) in enumerate(points)])
    response = read(client, auth, device, field="track.pos.loc", field_type="geo_point")
    assert response.data == _reference_json([(start_us + i * 1_000_000, "location", {"lat": lat, "lon": lon})
                                             for i, (lat, lon) in enumerate(points)])


def test_huge_whole_values_aggregate_to_exact_integers(client, auth, device, send):
    send([voltage("2020-07-09T10:00:01Z", 10 ** 18, "counter", "long"),
          voltage("2020-07-09T10:00:02Z", 2 ** 62, "counter", "long")])
    body = read(client, auth, device, field="counter", field_type="long", aggregation="max", interval="1h").get_json()
    assert body == [{"ts": "2020-07-09T10:00:01.000Z", "max_ts": 1594288802000, "value": 2 ** 62}]


@pytest.mark.parametrize("kind, value", [("long", 1e308), ("long", 2 ** 63), ("int", -(2 ** 63) - 1), ("long", 10 ** 20)])
def test_a_whole_reading_beyond_signed_64_bits_is_refused_at_ingest_naming_the_value(app, device, kind, value):
    reading = voltage("2020-07-09T10:00:01Z", value, "counter", kind)
    with pytest.raises(wire.WireError, match="value: a (int|long) value fits a signed 64-bit integer"):
        wire.from_builtins(wire.Reading, reading)
    payload = json.dumps({"v": 1, "batch_id": uuid.uuid4().hex, "readings": [reading]}).encode()
    with app.app_context():
        assert not ingest.handle_message(wire.device_topic(device["unit_id"], "telemetry"), payload)
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 0


@pytest.mark.parametrize("aggregation", ["sum", "avg", "max", "min"])
def test_aggregates_of_the_largest_doubles_are_finite_or_null_with_a_note(client, auth, device, send, aggregation):
    send([voltage("2020-07-09T10:00:01Z", 1.7e308, "big", "double"),
          voltage("2020-07-09T10:00:02Z", 1.7e308, "big", "double")])
    response = read(client, auth, device, field="big", field_type="double", aggregation=aggregation, interval="1h")
    assert response.status_code == 200, response.get_json()
    assert b"Infinity" not in response.data and b"NaN" not in response.data
    (entry,) = response.get_json()
    if aggregation == "sum":
        assert entry["value"] is None and "overflow" in entry["note"] and "sum" in entry["note"]
    else:
        assert entry["value"] == 1.7e308 and "note" not in entry


def test_a_sum_of_longs_beyond_signed_64_bits_is_null_with_a_note(client, auth, device, send):
    send([voltage(f"2020-07-09T10:00:0{i}Z", 2 ** 62, "counter", "long") for i in range(1, 5)])
    body = read(client, auth, device, field="counter", field_type="long", aggregation="sum", interval="1h").get_json()
    assert body == [{"ts": "2020-07-09T10:00:01.000Z", "max_ts": 1594288804000, "value": None,
                     "note": "overflow: the sum does not fit a long (a signed 64-bit integer)"}]


def test_a_raw_read_of_more_readings_than_allowed_is_refused_naming_to_utc(client, auth, device, send, monkeypatch):
    monkeypatch.setattr(service, "MAX_RAW_READINGS", 3)
    send([voltage(f"2020-07-09T10:00:0{i}Z", float(i)) for i in range(4)])
    response = read(client, auth, device, field="obd.bat.voltage", field_type="float")
    assert response.status_code == 400 and "to_utc" in response.get_json()["errors"], response.get_json()
    monkeypatch.setattr(service, "MAX_RAW_READINGS", 4)
    assert len(read(client, auth, device, field="obd.bat.voltage", field_type="float").get_json()) == 4


def test_a_batch_rolled_back_leaves_neither_its_readings_nor_its_id_and_can_be_stored_again(app, device, send):
    batch = {"batch_id": uuid.uuid4().hex, "dropped": 0, "readings": [
        {"field": "x", "type": "double", "ts": 1594288801.0, "value": 1.0},
        {"field": "track.pos.loc", "type": "geo_point", "ts": 1594288801.0, "value": {"lat": 1.0, "lon": 2.0}}]}
    with app.app_context():
        unit = db.session.get(Device, device["id"])
        assert service.record_telemetry(unit, wire.from_builtins(wire.TelemetryBatch, batch))
        db.session.rollback()
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 0
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryBatch)) == 0
    assert send(batch["readings"], batch["batch_id"])
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count()).select_from(TelemetryReading)) == 2


def test_readings_stored_before_entries_were_rendered_at_ingest_get_the_same_entries_from_the_migration(
        app, client, auth, device, send):
    send([voltage("2020-07-09T10:00:00.000001Z", -1.5e-07), voltage("2020-07-09T10:00:01Z", 3, "n", "int"),
          position("2020-07-09T10:00:02.5Z", -33.8688, 151.2093)])
    revision_file = Path(app.config["MIGRATIONS_DIR"]) / "versions" / "i7_telemetry_entry_json.py"
    spec = importlib.util.spec_from_file_location("i7_telemetry_entry_json", revision_file)
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    with app.app_context():
        rendered = db.session.execute(db.select(TelemetryReading.id, TelemetryReading.entry_json)).all()
        db.session.execute(db.update(TelemetryReading).values(entry_json=None))
        revision.render_missing_entries(db.session.connection())
        db.session.commit()
        assert db.session.execute(db.select(TelemetryReading.id, TelemetryReading.entry_json)).all() == rendered
    assert read(client, auth, device, field="track.pos.loc", field_type="geo_point").get_json() == [
        {"ts": "2020-07-09T10:00:02.500000Z", "location": {"lat": -33.8688, "lon": 151.2093}}]


def test_only_the_bucket_that_overflows_is_null(client, auth, device, send):
    send([voltage("2020-07-09T10:00:01Z", 1.7e308, "big", "double"),
          voltage("2020-07-09T10:00:02Z", 1.7e308, "big", "double"),
          voltage("2020-07-09T10:20:01Z", 1.5, "big", "double"),
          voltage("2020-07-09T10:20:02Z", 2.5, "big", "double")])
    body = read(client, auth, device, field="big", field_type="double", aggregation="sum", interval="10m").get_json()
    assert [entry["value"] for entry in body] == [None, 4.0]
    assert body[0]["note"] == "overflow: the sum does not fit a double (a finite double)" and "note" not in body[1]
