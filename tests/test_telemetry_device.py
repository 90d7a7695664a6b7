"""The device's telemetry parts on their own: on-disk buffer, batches, sources, local API input."""
import json
from pathlib import Path

import pytest

import fleet_wire as wire
from fleet_device.telemetry import (
    FileSource, SourceUnavailable, TelemetryBuffer, parse_file_source, position_from_gpsd, reading_from_request,
)


def readings(count, start=0):
    return [{"field": "obd.bat.voltage", "type": "float", "ts": 1594289017.0 + i, "value": float(i)}
            for i in range(start, start + count)]


def values(batch):
    return [r.value for r in wire.decode(wire.TelemetryBatch, batch.payload).readings]


def test_readings_wait_on_disk_and_survive_a_restart(tmp_path):
    buffer = TelemetryBuffer(tmp_path / "t.db", capacity=100, batch_size=10)
    buffer.add(readings(3))
    buffer.close()
    reopened = TelemetryBuffer(tmp_path / "t.db", capacity=100, batch_size=10)
    assert reopened.stats()["waiting"] == 3
    assert values(reopened.next_batch()) == [0.0, 1.0, 2.0]


def test_batches_take_the_oldest_readings_up_to_the_batch_size(tmp_path):
    buffer = TelemetryBuffer(tmp_path / "t.db", capacity=100, batch_size=4)
    buffer.add(readings(10))
    first = buffer.next_batch()
    assert values(first) == [0.0, 1.0, 2.0, 3.0]
    assert buffer.mark_stored([first.batch_id]) == 1
    second = buffer.next_batch()
    assert values(second) == [4.0, 5.0, 6.0, 7.0] and second.batch_id != first.batch_id


def test_an_unconfirmed_batch_is_sent_again_with_the_same_id_and_bytes_even_after_a_restart(tmp_path):
    buffer = TelemetryBuffer(tmp_path / "t.db", capacity=100, batch_size=4)
    buffer.add(readings(6))
    first = buffer.next_batch()
    buffer.add(readings(2, start=6))
    assert buffer.next_batch() == first
    buffer.close()
    assert TelemetryBuffer(tmp_path / "t.db", capacity=100, batch_size=4).next_batch() == first


def test_a_full_buffer_drops_the_oldest_readings_and_reports_how_many(tmp_path):
    buffer = TelemetryBuffer(tmp_path / "t.db", capacity=5, batch_size=100)
    assert buffer.add(readings(3)) == 0
    assert buffer.add(readings(4, start=3)) == 2
    assert buffer.stats() == {"waiting": 5, "in_flight": 0, "dropped": 2, "capacity": 5}
    batch = buffer.next_batch()
    assert values(batch) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert wire.decode(wire.TelemetryBatch, batch.payload).dropped == 2


def test_an_empty_buffer_forms_no_batch(tmp_path):
    assert TelemetryBuffer(tmp_path / "t.db").next_batch() is None


def test_a_file_source_reads_a_number_and_scales_it(tmp_path):
    path = tmp_path / "voltage_now"
    path.write_text("12600000\n")
    source = parse_file_source(f"obd.bat.voltage={path}*0.000001")
    reading = wire.from_builtins(wire.Reading, source.read())
    assert (reading.field, reading.type, reading.value) == ("obd.bat.voltage", "double", pytest.approx(12.6))


def test_a_file_source_without_its_file_or_number_is_unavailable(tmp_path):
    with pytest.raises(SourceUnavailable, match="missing"):
        FileSource("x", tmp_path / "missing").read()
    (tmp_path / "text").write_text("on\n")
    with pytest.raises(SourceUnavailable, match="number"):
        FileSource("x", tmp_path / "text").read()


def test_uptime_is_read_from_the_real_proc_file():
    from fleet_device.telemetry import uptime_source

    reading = wire.from_builtins(wire.Reading, uptime_source().read())
    assert reading.field == "sys.uptime" and reading.value > 0


@pytest.mark.parametrize("text", ["novalue", "=/x", "f=", "f=/x*ten", "bad field=/x"])
def test_a_malformed_file_source_option_is_refused(text):
    with pytest.raises(ValueError):
        parse_file_source(text)


def test_a_gpsd_fix_becomes_a_position_and_other_reports_do_not():
    tpv = {"class": "TPV", "mode": 3, "time": "2020-07-09T10:11:53.811Z", "lat": 57.04699, "lon": 9.93909}
    reading = position_from_gpsd(json.dumps(tpv))
    assert reading == wire.Reading(field="track.pos.loc", type="geo_point", ts=1594289513.811,
                                   value=wire.GeoPoint(lat=57.04699, lon=9.93909))
    assert position_from_gpsd(json.dumps({**tpv, "mode": 1})) is None
    assert position_from_gpsd(json.dumps({"class": "SKY"})) is None
    assert position_from_gpsd(b"garbage") is None


def test_a_posted_reading_takes_its_iso_timestamp_or_now():
    reading = reading_from_request({"field": "a", "type": "int", "value": 3, "ts": "2020-07-09T10:11:53.811839Z"})
    assert reading.ts == pytest.approx(1594289513.811839, abs=1e-6)
    assert reading_from_request({"field": "a", "type": "int", "value": 3}, now=5.0).ts == 5.0


@pytest.mark.parametrize("body, key", [
    ({"field": "a", "type": "int", "value": 1.5}, "value"),
    ({"field": "a", "type": "geo_point", "value": 1}, "value"),
    ({"field": "a", "type": "text", "value": 1}, "type"),
    ({"type": "int", "value": 1}, "field"),
    ({"field": "a", "type": "int", "value": 1, "ts": "soon"}, "ts"),
    ({"field": "a", "type": "int", "value": 1, "unit": "V"}, "unit"),
])
def test_a_bad_posted_reading_is_refused_naming_the_key(body, key):
    with pytest.raises(wire.WireError, match=f"^{key}:"):
        reading_from_request(body)
