"""Where a received instance comes from: an acquisition, this node's own output, another AI.

A PACS or a person may send the node's outputs back to it (an echo loop, the top
complaint about routers). The node recognises such instances from their *content*, never
from the sending AE title:

* the SOP Instance UID is one the node wrote (its ``job_outputs``), or
* a Contributing Equipment item names dicom-node with this node's AE title as Station
  Name (every output the node writes carries one), or names dicom-node without a Station
  Name (outputs written before the Station Name was added) and the SOP Instance UID is
  under this node's own configured UID root.

Such an instance is stored and audited ("own output returned") but never opens a study
version, a job or a delivery. An object another AI node made — dicom-node equipment with
another Station Name, Synthesizing Equipment (DCM 109100) or Synthetic Data YES — is an
``ai-output``: stored, but no rule sees it unless the rule says ``ai_outputs: accept``.

A ``prior`` is an instance the node itself retrieved from an archive
(:mod:`dicom_node.ingest.archives`): the role comes from the retrieval, never from the
data — a C-GET or WADO-RS response the node asked for, or a C-STORE sub-operation of the
node's own C-MOVE (Move Originator AE Title = this node, from a configured archive's AE).
A prior never opens a study version, never starts a job and is never forwarded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, select

from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.instance import InstanceFacts

#: Manufacturer of every object the node writes (pipelines.writers.common.NODE_MANUFACTURER;
#: the ingest layer does not import the pipelines, so it is spelled here too).
NODE_MANUFACTURER = "dicom-node"
#: Purpose of Reference code of equipment that generated the pixels.
SYNTHESIZING_EQUIPMENT = "109100"
#: The generic UUID-derived root: every site can mint UIDs under it, so it proves nothing.
UUID_ROOT = "2.25."

OWN_OUTPUT = "own-output"
AI_OUTPUT = "ai-output"
PRIOR = "prior"


@dataclass(frozen=True)
class Origin:
    """``role`` is None for an acquired instance; ``why`` says what gave it away."""

    role: str | None
    why: str | None = None


ACQUIRED = Origin(None)


def retrieved(archive: str, content: Origin) -> Origin:
    """The origin of an instance retrieved from ``archive``: always a prior (what its
    content says, e.g. an output of this node kept in the archive, is noted beside it)."""
    why = f"retrieved from archive {archive}"
    return Origin(PRIOR, why if content.role is None else f"{why}; content: {content.role} ({content.why})")


@dataclass(frozen=True)
class OriginRules:
    """Recognises this node's outputs (AE title, UID root, the outputs it wrote)."""

    ae_title: str
    uid_root: str = UUID_ROOT
    #: Is this SOP Instance UID one of the node's outputs? (a lookup in ``job_outputs``)
    is_known_output: Callable[[str], bool] | None = None

    def _own_root(self, sop_uid: str) -> bool:
        root = self.uid_root if self.uid_root.endswith(".") else self.uid_root + "."
        return root != UUID_ROOT and sop_uid.startswith(root)

    def classify(self, facts: InstanceFacts) -> Origin:
        ours = [p for p in facts.producers if p.manufacturer == NODE_MANUFACTURER]
        suspicious = (
            bool(facts.producers) or facts.synthetic or facts.sop_instance_uid.startswith(self.uid_root)
        )
        # The lookup runs only for instances that could be outputs (one indexed query).
        if suspicious and self.is_known_output is not None and self.is_known_output(facts.sop_instance_uid):
            return Origin(OWN_OUTPUT, "its SOP Instance UID is an output this node wrote")
        if any(p.station_name == self.ae_title for p in ours):
            return Origin(OWN_OUTPUT, f"Contributing Equipment names dicom-node {self.ae_title}")
        if any(p.station_name is None for p in ours) and self._own_root(facts.sop_instance_uid):
            return Origin(OWN_OUTPUT, "dicom-node Contributing Equipment and this node's UID root")
        if ours:
            stations = sorted({p.station_name or "unnamed" for p in ours})
            return Origin(AI_OUTPUT, f"made by another dicom-node ({', '.join(stations)})")
        if any(p.purpose == SYNTHESIZING_EQUIPMENT for p in facts.producers):
            makers = sorted(
                {p.manufacturer or "unnamed" for p in facts.producers if p.purpose == SYNTHESIZING_EQUIPMENT}
            )
            return Origin(
                AI_OUTPUT, f"Synthesizing Equipment in Contributing Equipment ({', '.join(makers)})"
            )
        if facts.synthetic:
            return Origin(AI_OUTPUT, "Synthetic Data is YES")
        return ACQUIRED


_JOB_OUTPUT = select(t.job_outputs.c.id).where(t.job_outputs.c.sop_uid == bindparam("sop_uid")).limit(1)


def job_output_lookup(db: Database) -> Callable[[str], bool]:
    """``is_known_output`` for :class:`OriginRules`: one indexed read on the hot path."""

    def is_known_output(sop_uid: str) -> bool:
        return db.lookup(_JOB_OUTPUT, sop_uid=sop_uid) is not None

    return is_known_output
