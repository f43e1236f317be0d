"""Test-side access to the local peers (they live in the package: the demo uses them too)."""

from dicom_node.lab.localpeers import *  # noqa: F403
from dicom_node.lab.localpeers import (  # noqa: F401
    DCIODVFY,
    ECHOSCU,
    NODE_ENV,
    ORTHANC,
    STORESCP,
    STORESCU,
    DcmtkStoreSCP,
    NodeProcess,
    Orthanc,
    free_port,
    have,
    policy_yaml,
    stop,
    storescu,
    wait_port,
)
