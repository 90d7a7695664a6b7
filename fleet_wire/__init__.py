"""Fleet's MQTT wire contract, shared by the server and the device agent (and importing neither).

Topic names, the messages (msgspec Structs, each declared once), the grammar both sides
check values with and the protocol version are defined here and imported by both sides, so
the two cannot drift apart.

The wire grows without breaking (docs/architecture.md, "Evolving the wire"): every message
here ignores fields it does not know, and a change to the protocol only adds optional
fields, so an older agent and a newer server (or the reverse) keep understanding each other.
"""

from .protocol import (  # noqa: F401
    INT64_MAX,
    INT64_MIN,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    RELEASE_SEQ_MARKER_TOPIC,
    SHARED_GROUP,
    TOPIC_ROOT,
    WireError,
)
from .strict_json import (  # noqa: F401
    MAX_JSON_DEPTH,
    check_storable,
    load_json,
    UnstorableJSON,
)
from .grammar import (  # noqa: F401
    COMMAND_NAME_PATTERN,
    CONTAINER_NAME_PATTERN,
    ENVIRONMENT_KEY_PATTERN,
    NETWORK_MODE_PATTERN,
    REGISTRY_URL_PATTERN,
    RESTART_POLICY_PATTERN,
    check_bind,
    check_command_name,
    check_container_name,
    check_environment_key,
    check_network_mode,
    check_restart_policy,
    check_registry_url,
    fully_qualified_name,
    parse_environment,
    StartupParameters,
)
from .topics import (  # noqa: F401
    device_topic,
    DeviceTopic,
    parse_topic,
    release_subscription,
    release_topic,
    shared_subscription,
)
from .messages import (  # noqa: F401
    DEPLOYMENT_STATES,
    FINAL_DEPLOYMENT_STATES,
    SERVER_DEPLOYMENT_STATES,
    check_deployment_state,
    ContainerSpec,
    decode,
    DeploymentReport,
    encode,
    from_builtins,
    Message,
    RegistryCredentials,
    ReleaseMessage,
    ReleaseSeqMarker,
    ReleaseSpec,
    Status,
)
from .telemetry import (  # noqa: F401
    FIELD_NAME,
    FIELD_NAME_PATTERN,
    GEO_POINT,
    GeoPoint,
    INTEGER_TYPES,
    MAX_BATCH_READINGS,
    NUMERIC_TYPES,
    Reading,
    TELEMETRY_TYPES,
    TelemetryBatch,
)
from .commands import (  # noqa: F401
    COMMAND_REPORT_STATES,
    COMMAND_STATES,
    FINAL_COMMAND_STATES,
    MAX_COMMAND_ARGUMENTS_BYTES,
    MAX_COMMAND_ERROR,
    MAX_COMMAND_TIMEOUT,
    command_rank,
    CommandMessage,
    CommandResult,
)
from .confirmations import (  # noqa: F401
    MAX_CONFIRMED_IDS,
    Confirmation,
    confirmation_id,
)
