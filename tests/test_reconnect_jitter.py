"""The device's reconnection policy: waits drawn over a window that doubles per failed attempt."""
import uuid

from fleet_device.mqtt import DeviceMqtt, MqttSettings


def _session(**settings):
    return DeviceMqtt(MqttSettings(client_id=f"fleet-device-{uuid.uuid4()}", **settings), on_message=lambda m: None)


def _next_wait(session):
    session._jitter_next_reconnect()
    return session.client._reconnect_min_delay  # what paho waits before its next attempt


def test_first_reconnections_of_many_devices_spread_over_the_whole_window():
    waits = []
    for _ in range(400):
        session = _session(reconnect_window=12)
        session.reconnect_attempts = 0  # as after a successful connection
        session._on_disconnect(session.client, None, None, None, None)
        waits.append(session.client._reconnect_min_delay)
    assert all(1 <= wait <= 12 for wait in waits)
    # Uniform over [1, 12]: every third of the window gets a fair share, none gets all.
    thirds = [sum(lo <= w < lo + 11 / 3 for w in waits) for lo in (1, 1 + 11 / 3, 1 + 22 / 3)]
    assert all(80 <= count <= 190 for count in thirds), thirds


def test_each_failed_attempt_doubles_the_window_up_to_the_cap():
    session = _session(reconnect_window=10, reconnect_max=40)
    session.reconnect_attempts = 0
    windows = [_next_wait(session) for _attempt in range(5)]
    assert windows[0] <= 10 and windows[1] <= 20 and all(w <= 40 for w in windows[2:])
    draws = []
    for _ in range(200):
        session.reconnect_attempts = 2  # the next draw is the third attempt: window 40
        draws.append(_next_wait(session))
    assert max(draws) > 20  # beyond the second window: it did double


def test_a_successful_connection_resets_the_window_subscribes_again_and_tells_the_agent():
    told = []
    session = DeviceMqtt(MqttSettings(client_id=f"fleet-device-{uuid.uuid4()}", reconnect_window=10,
                                      subscriptions=("fleet/a", "fleet/b")),
                         on_message=lambda m: None, on_connected=told.append)
    for _ in range(4):
        session._jitter_next_reconnect()
    subscribed = []
    session.client.subscribe = lambda topics, **kwargs: subscribed.append(topics)

    class Accepted:
        is_failure = False

    class Flags:
        session_present = True

    session._on_connect(session.client, None, Flags(), Accepted(), None)
    assert session.reconnect_attempts == 0 and session.connected.is_set()
    assert subscribed == [[("fleet/a", 1), ("fleet/b", 1)]] and told == [True]
    assert _next_wait(session) <= 10
