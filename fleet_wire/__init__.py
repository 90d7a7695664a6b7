"""Fleet's MQTT wire contract, shared by the server and the device agent (and importing neither).

Topic names, payload schemas and the protocol version are defined here once and
imported by both sides, so the two cannot drift apart.

The wire grows without breaking (docs/architecture.md, "Evolving the wire"): every schema
here ignores fields it does not know, and a change to the protocol only adds optional
fields, so an older agent and a newer server (or the reverse) keep understanding each other.
"""

from .protocol import (  # noqa: F401
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
    REGISTRY_URL_PATTERN,
    check_bind,
    check_container_name,
    check_registry_url,
    parse_environment,
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
    REPORT_ID,
    SERVER_DEPLOYMENT_STATES,
    check_deployment_state,
    ContainerSpecSchema,
    decode,
    deployment_report,
    DeploymentReportSchema,
    encode,
    Message,
    RegistryCredentialsSchema,
    release_message,
    release_seq_marker,
    ReleaseMessageSchema,
    ReleaseSeqMarkerSchema,
    ReleaseSpecSchema,
    StartupParametersSchema,
    status_message,
    StatusSchema,
)
from .telemetry import (  # noqa: F401
    FIELD_NAME,
    GEO_POINT,
    INT64_MAX,
    INT64_MIN,
    INTEGER_TYPES,
    MAX_BATCH_READINGS,
    NUMERIC_TYPES,
    TELEMETRY_TYPES,
    check_reading,
    ReadingList,
    telemetry_batch,
    telemetry_payload,
    TelemetryBatchSchema,
)
from .commands import (  # noqa: F401
    COMMAND_REPORT_STATES,
    COMMAND_STATES,
    FINAL_COMMAND_STATES,
    MAX_COMMAND_ARGUMENTS_BYTES,
    MAX_COMMAND_ERROR,
    MAX_COMMAND_TIMEOUT,
    command_message,
    command_payload,
    command_rank,
    command_result,
    CommandMessageSchema,
    CommandResultSchema,
)
from .confirmations import (  # noqa: F401
    MAX_CONFIRMED_IDS,
    confirmation,
    confirmation_id,
    confirmation_payload,
    ConfirmationSchema,
)
