"""The device's MQTT session on a real broker: TCP_NODELAY on its socket, v5 properties as plain values."""
import queue
import socket
import uuid

from fleet_device.mqtt import DeviceMqtt, MqttSettings


def test_a_session_sets_nodelay_and_carries_correlation_expiry_and_acknowledgement_as_plain_values(broker):
    topic = f"fleet-test/{uuid.uuid4()}/commands"
    received: queue.Queue = queue.Queue()
    session = DeviceMqtt(MqttSettings(client_id=f"fleet-device-{uuid.uuid4()}", host=broker.host, port=broker.port,
                                      subscriptions=(topic,), reconnect_window=1),
                         on_message=received.put, on_connected=lambda session_present: received.put("connected"))
    session.start()
    try:
        assert received.get(timeout=10) == "connected"
        assert session.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

        session.publish(topic, b'{"ping": 1}', qos=1, correlation=b"command-7").wait_for_publish(5)
        message = received.get(timeout=10)
        assert (message.topic, message.payload, message.qos, message.correlation) == (
            topic, b'{"ping": 1}', 1, b"command-7")
        assert message.expires_in is None and message.response_topic is None
        session.ack(message)

        session.publish(topic, b"plain", qos=1).wait_for_publish(5)
        assert received.get(timeout=10).correlation is None
    finally:
        session.stop()
    assert not session.connected.is_set()
