"""The agent's reconnection policy: waits drawn over a window that doubles per failed attempt."""
import uuid

from fleet_device.agent import Agent, AgentConfig


class NoEngine:
    report = None


def _agent(tmp_path, **config):
    settings = AgentConfig(unit_id=str(uuid.uuid4()), state_dir=tmp_path, minion_id_file=None, **config)
    return Agent(settings, deployer=NoEngine())


def _next_wait(agent):
    agent._jitter_next_reconnect()
    return agent.client._reconnect_min_delay  # what paho waits before its next attempt


def test_first_reconnections_of_many_agents_spread_over_the_whole_window(tmp_path):
    waits = []
    for index in range(400):
        agent = _agent(tmp_path / str(index), reconnect_window=12)
        agent.reconnect_attempts = 0  # as after a successful connection
        agent._on_disconnect(agent.client, None, None, None, None)
        waits.append(agent.client._reconnect_min_delay)
    assert all(1 <= wait <= 12 for wait in waits)
    # Uniform over [1, 12]: every third of the window gets a fair share, none gets all.
    thirds = [sum(lo <= w < lo + 11 / 3 for w in waits) for lo in (1, 1 + 11 / 3, 1 + 22 / 3)]
    assert all(80 <= count <= 190 for count in thirds), thirds


def test_each_failed_attempt_doubles_the_window_up_to_the_cap(tmp_path):
    agent = _agent(tmp_path, reconnect_window=10, reconnect_max=40)
    agent.reconnect_attempts = 0
    windows = []
    for _attempt in range(5):
        waits = [_next_wait(agent) for _ in range(1)]
        windows.append(max(waits))
    assert windows[0] <= 10 and windows[1] <= 20 and all(w <= 40 for w in windows[2:])
    draws = []
    for _ in range(200):
        agent.reconnect_attempts = 2  # the next draw is the third attempt: window 40
        draws.append(_next_wait(agent))
    assert max(draws) > 20  # beyond the second window: it did double


def test_a_successful_connection_resets_the_window(tmp_path):
    agent = _agent(tmp_path, reconnect_window=10)
    for _ in range(4):
        agent._jitter_next_reconnect()
    agent.client.subscribe = lambda *args, **kwargs: None
    agent.publish_status = lambda state: None

    class Accepted:
        is_failure = False

    class Flags:
        session_present = False

    agent._on_connect(agent.client, None, Flags(), Accepted(), None)
    assert agent.reconnect_attempts == 0
    assert _next_wait(agent) <= 10
