"""End to end: readings from the device's local API and sources, over the real broker, into the logbook."""
import pytest
import requests

from tests.support.stack import eventually, running_stack

pytestmark = pytest.mark.slow

READ = "/logbook/storage/read/"
WINDOW = {"from_utc": "2020-07-09T00:00:00Z", "to_utc": "2020-07-10T00:00:00Z"}
QUIET = ["--telemetry-sources", ""]  # no built-in sampling unless a test asks for it


def push(agent, body):
    return requests.post(agent.api_url + "/logbook/", json=body, timeout=10)


def series(stack, device, field="obd.bat.voltage", field_type="float", **params):
    response = stack.get(READ, params={"device_id": device["id"], "field": field, "field_type": field_type,
                                       **WINDOW, **params})
    assert response.status_code == 200, response.text
    return response.json()


def voltages(start, count):
    return [{"field": "obd.bat.voltage", "type": "float", "value": float(i),
             "ts": f"2020-07-09T10:{i // 60 % 60:02d}:{i % 60:02d}Z"} for i in range(start, start + count)]


def test_a_reading_pushed_to_the_local_api_comes_out_of_the_logbook(stack):
    device = stack.create_device()
    agent = stack.start_agent(device, extra_args=QUIET)
    response = push(agent, {"field": "track.pos.loc", "type": "geo_point", "value": {"lat": 57.04699, "lon": 9.93909},
                            "ts": "2020-07-09T10:11:53.811839Z"})
    assert response.status_code == 202, response.text
    expected = [{"ts": "2020-07-09T10:11:53.811839Z", "location": {"lat": 57.04699, "lon": 9.93909}}]
    eventually(lambda: series(stack, device, "track.pos.loc", "geo_point") == expected, 30,
               message="the position in the logbook")


def test_a_voltage_read_from_a_file_source_comes_out_of_the_logbook(stack, tmp_path):
    voltage_file = tmp_path / "in_voltage0_raw"
    voltage_file.write_text("12600\n")
    device = stack.create_device()
    stack.start_agent(device, extra_args=["--telemetry-sources", "uptime", "--telemetry-interval", "0.5",
                                          "--telemetry-file", f"obd.bat.voltage={voltage_file}*0.001"])
    window = {"from_utc": "2000-01-01T00:00:00Z", "to_utc": "2100-01-01T00:00:00Z"}
    entries = eventually(lambda: series(stack, device, field_type="double", **window), 30,
                         message="a sampled voltage")
    assert entries[0]["value"] == pytest.approx(12.6)
    uptimes = eventually(lambda: series(stack, device, "sys.uptime", "double", **window), 30, message="uptime")
    assert uptimes[0]["value"] > 0


def test_a_bad_reading_is_refused_by_the_local_api_naming_what_is_wrong(stack):
    agent = stack.start_agent(stack.create_device(), extra_args=QUIET)
    response = push(agent, [voltages(0, 1)[0], {"field": "obd.bat.voltage", "type": "float", "value": "high"}])
    assert response.status_code == 400
    assert response.json()["message"].startswith("[1] value:"), response.text
    assert requests.post(agent.api_url + "/logbook/", data=b"not json", timeout=10).status_code == 400
    assert requests.get(agent.api_url + "/logbook/", timeout=10).json()["waiting"] == 0


@pytest.fixture
def restartable_stack(restartable_broker, docker_client, tmp_path):
    """Server and worker (with a stable worker id) against a broker the test may restart."""
    with running_stack(restartable_broker.url, docker_client, tmp_path, worker_id="telemetry-restart",
                       web_workers=1) as running:
        yield running



def eventually_with_logs(stack, predicate, timeout, message):
    """`eventually`, failing with the server's, worker's and agent's logs attached."""
    try:
        return eventually(predicate, timeout, interval=0.5, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None


def _values(stack, device):
    return [entry["value"] for entry in series(stack, device)]


def test_readings_taken_while_the_broker_is_down_arrive_once_when_it_returns(restartable_stack, restartable_broker):
    stack = restartable_stack
    device = stack.create_device()
    agent = stack.start_agent(device, extra_args=QUIET)
    assert push(agent, voltages(0, 50)).status_code == 202
    eventually(lambda: len(_values(stack, device)) == 50, 30, message="the first readings")

    restartable_broker.stop()
    for start in range(50, 200, 50):
        assert push(agent, voltages(start, 50)).status_code == 202
    assert requests.get(agent.api_url + "/logbook/", timeout=10).json()["waiting"] > 0
    restartable_broker.start()

    eventually_with_logs(stack, lambda: len(_values(stack, device)) >= 200, 90, "the buffered readings")
    assert _values(stack, device) == [float(i) for i in range(200)], stack.logs()


def test_readings_sent_while_the_worker_is_down_are_stored_once_when_it_returns(restartable_stack):
    stack = restartable_stack
    device = stack.create_device()
    agent = stack.start_agent(device, extra_args=QUIET + ["--telemetry-batch", "20"])
    assert push(agent, voltages(0, 40)).status_code == 202
    eventually(lambda: len(_values(stack, device)) == 40, 30, message="the first readings")

    stack.worker.kill()  # no goodbye: whatever it had not acknowledged is redelivered
    for start in range(40, 240, 40):
        assert push(agent, voltages(start, 40)).status_code == 202
    # The batch the broker took waits for the server's confirmation; the others wait behind it.
    eventually(lambda: requests.get(agent.api_url + "/logbook/", timeout=10).json()["in_flight"] > 0, 30,
               message="the agent to hand a batch to the broker")
    assert len(_values(stack, device)) == 40
    stack.worker = stack.start_worker("telemetry-restart")

    eventually_with_logs(stack, lambda: len(_values(stack, device)) >= 240, 60, "the readings queued for the worker")
    assert _values(stack, device) == [float(i) for i in range(240)], stack.logs()
