"""The protocol's version, topic roots and limits, and the error every part of the contract raises."""
PROTOCOL_VERSION = 1
TOPIC_ROOT = "fleet/v1/devices"
# Retained, written and read by the server's workers only: the highest release seq published.
RELEASE_SEQ_MARKER_TOPIC = "fleet/v1/server/release-seq"
SHARED_GROUP = "fleet-server"

# The integers every value on the wire fits: what a BIGINT column (and SQLite's INTEGER) stores.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# Largest payload either side accepts; anything bigger is dropped unparsed.
MAX_PAYLOAD_BYTES = 1024 * 1024


class WireError(ValueError):
    """A message that does not follow the wire contract."""
