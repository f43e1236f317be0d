"""The C-ECHO / C-STORE SCP. Handlers are small: check, store, answer with a named status.

Handlers are bound as data (see :meth:`Receiver.handlers`). Association policy lives in
``EVT_REQUESTED``: calling AE titles not on the allow-list, or connecting from a host the
AE is not tied to, are rejected before negotiation with A-ASSOCIATE-RJ (rejected-
permanent, calling AE not recognised).

With a commitment handler the receiver also takes the Storage Commitment Push Model in the
SCU role: a destination the node asked to commit reports back on a new association
(proposing the SCP role for itself) with an N-EVENT-REPORT, which is handed to the
commitment handler serve wires in (delivery's storage commitment bookkeeping) and answered
with its status. A destination with ``storage_commitment`` set may
connect for this even when ``require_known_callers`` is on.

The C-STORE sub-operations of the node's own C-MOVE (:mod:`dicom_node.ingest.archives`)
arrive here too: an instance whose Move Originator AE Title (0000,1030) is this node's AE
title, sent by the AE title of a configured archive, is stored as a ``prior`` (it never
starts a job). A configured archive may store from its host even when
``require_known_callers`` is on.

With procedure steps (:mod:`dicom_node.ingest.mpps`) it is also the MPPS SCP: a scanner's
N-CREATE / N-SET go to their handlers, over the same association policy.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import NodeConfig
from dicom_node.ingest.instance import Rejection, StoreStatus
from dicom_node.ingest.mpps import MPPS_SOP_CLASS, PerformedProcedureSteps
from dicom_node.ingest.part10 import encode_file_meta
from dicom_node.ingest.staging import StagedDataSet
from dicom_node.ingest.store import InstanceStore, StoreOutcome, StoreResult
from dicom_node.net.balance import Balancer
from dicom_node.net.commitment import (
    PUSH_MODEL,
    CommitmentReport,
    CommitmentReportError,
    ReportStatus,
    parse_event_report,
)
from dicom_node.net.dimse_guard import CommandDefect, DataSetLimits, command_defect, install_dimse_guard
from dicom_node.net.guard import ConnectionGuard, guard_server, serve_handed
from dicom_node.net.hostnames import HostNames
from dicom_node.net.tls import certificate_problem, peer_certificate, server_context
from dicom_node.net.tls import check_config as check_tls
from dicom_node.net.tuning import on_connection_open, tune_pynetdicom
from dicom_node.paths import NodePaths
from dicom_node.safelog import describe_exception

log = logging.getLogger(__name__)

#: Records a storage commitment result: (report, calling AE, peer host, via) → status.
CommitmentHandler = Callable[..., int]

_REJECT_PERMANENT, _SOURCE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x03, 0x07


@dataclass
class _AssociationTally:
    calling_ae: str
    peer_host: str
    called_ae: str | None = None
    counts: Counter[str] = field(default_factory=Counter)
    studies: dict[str, set[str]] = field(default_factory=dict)
    patient_by_study: dict[str, str] = field(default_factory=dict)


class DiskGuard:
    """Answers "is there room?" from statvfs, at most every 0.5 s per call site."""

    def __init__(self, path: os.PathLike[str] | str, min_free_mb: int) -> None:
        self.path = path
        self.min_free = min_free_mb * 1024 * 1024

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def has_room(self) -> bool:
        return self.min_free == 0 or self.free_bytes() >= self.min_free


@dataclass
class Taken:
    """What became of one received data set: its status (0x0000 stored, or a duplicate of
    a stored one), the reason for a refusal, the store's result, and the tally it counts in
    (``stored``, ``duplicate``, ``new-version``, ``rejected``, ``refused``, ``failed``)."""

    status: int
    reason: str | None
    result: StoreResult | None = None
    counted: str = "failed"


class Receiver:
    """The node's storage SCP."""

    def __init__(
        self,
        config: NodeConfig,
        paths: NodePaths,
        store: InstanceStore,
        audit: AuditTrail,
        commitment_reports: CommitmentHandler | None = None,
        procedure_steps: PerformedProcedureSteps | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        #: Where N-EVENT-REPORTs go (``StorageCommitments.record_report``; None: not accepted).
        self.commitment_reports = commitment_reports
        #: The MPPS SCP (N-CREATE / N-SET) a scanner reports its procedure steps to (None: refused).
        self.procedure_steps = procedure_steps
        self.disk = DiskGuard(paths.var, config.receiver.min_free_disk_mb)
        #: Relative [tls] files are under the home.
        self.home = paths.home
        #: The board the node's receiving processes share (``[node] receivers`` > 1).
        self.board_path = paths.run / "receivers.board"
        self._balancer: Balancer | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._tally_lock = threading.Lock()
        self._servers: list[Any] = []
        #: What the started servers listen on, e.g. ``127.0.0.1:2762 (TLS)`` (for the banner).
        self.listening: list[str] = []
        #: Callers' and destinations' hosts, names resolved at most once per refresh period.
        self.host_names = HostNames(config.receiver.caller_hosts_refresh_seconds)

    # -- lifecycle --------------------------------------------------------------------

    def handlers(self) -> list[Any]:
        steps = self.procedure_steps
        mpps = [] if steps is None else [(evt.EVT_N_CREATE, steps.on_create), (evt.EVT_N_SET, steps.on_set)]
        return [
            (evt.EVT_CONN_OPEN, on_connection_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_CONN_CLOSE, self.on_connection_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_N_EVENT_REPORT, self.on_event_report),
            *mpps,
        ]

    def build_ae(self) -> AE:
        tune_pynetdicom()
        install_dimse_guard()  # malformed C-STORE requests reach on_store (see net.dimse_guard)
        rc = self.config.receiver
        ae = AE(ae_title=self.config.node.ae_title)
        ae.maximum_associations = rc.max_associations
        ae.maximum_pdu_size = rc.max_pdu_bytes
        ae.acse_timeout = rc.acse_timeout_seconds
        ae.dimse_timeout = rc.dimse_timeout_seconds
        ae.network_timeout = rc.network_timeout_seconds
        ae.require_called_aet = rc.require_called_ae
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.procedure_steps is not None:
            ae.add_supported_context(MPPS_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if self.commitment_reports is not None:
            # The reporting peer proposes the SCP role for itself; we take the SCU role.
            ae.add_supported_context(
                PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=False, scp_role=True
            )
        return ae

    def listeners(self) -> list[tuple[tuple[str, int], Any]]:
        """The addresses to listen on, each with its TLS context (None: plain): [node] port
        unless [tls] plain is false, and [tls] port when set (:mod:`dicom_node.net.tls`).

        Raises :class:`~dicom_node.net.tls.TlsConfigError` when the TLS files cannot be used.
        """
        node, tls = self.config.node, self.config.tls
        found: list[tuple[tuple[str, int], Any]] = []
        if tls.plain or tls.port is None:
            found.append(((node.host, node.port), None))
        if tls.port is not None:

            def handshake_refused(peer_host: str, reason: str) -> None:
                # No AE title yet: the TLS handshake comes before the A-ASSOCIATE-RQ.
                self.audit.record(
                    AuditEvent.SECURITY_ALERT,
                    Outcome.MINOR_FAILURE,
                    called_ae=node.ae_title,
                    peer_host=peer_host,
                    alert="node-authentication",
                    reason=reason,
                )

            context = server_context(tls, self.home, on_refused=handshake_refused)
            found.append(((node.host, tls.port), context))
        return found

    def start(self) -> None:
        # Every TLS file the config names (server, destinations, caller bindings) is
        # checked before any port opens: one line per problem, not a failed association later.
        check_tls(self.config, self.home)
        ae = self.build_ae()
        node = self.config.node
        for address, ssl_context in self.listeners():
            try:
                server = (
                    _start_shared_server(ae, address, self.handlers(), ssl_context)
                    if node.receivers > 1
                    else ae.start_server(
                        address, block=False, evt_handlers=self.handlers(), ssl_context=ssl_context
                    )
                )
            except OSError as exc:
                self.stop()  # all the node's ports or none
                raise OSError(exc.errno, f"{exc.strerror} ({address[0]}:{address[1]})") from None
            guard = guard_server(server, self.config.receiver, self.audit)
            self._servers.append(server)
            where = f"{address[0]}:{address[1]}{' (TLS)' if ssl_context is not None else ''}"
            self.listening.append(where)
            log.info("receiver listening on %s as %s", where, node.ae_title)
        if node.receivers > 1 and self._servers:
            self._balance(guard)

    def _balance(self, guard: ConnectionGuard) -> None:
        """Even out connections over the node's receiving processes (:mod:`dicom_node.net.balance`)."""
        by_port = {server.server_address[1]: server for server in self._servers}

        def serve(port: int, sock: socket.socket) -> None:
            server = by_port.get(port)
            if server is None:  # another config than ours: not ours to serve
                sock.close()
                return
            serve_handed(server, sock)

        balancer = Balancer(self.board_path, guard.open_connections, serve)
        try:
            balancer.start()
        except (OSError, RuntimeError) as exc:  # receiving matters more than spreading
            log.warning("receiving processes: connections not evened out here: %s", exc)
            balancer.stop()
            return
        guard.on_count = balancer.board.publish
        balancer.board.publish(guard.open_connections())
        for server in self._servers:
            server._dn_balancer = balancer
        self._balancer = balancer

    def stop(self) -> None:
        balancer, self._balancer = self._balancer, None
        if balancer is not None:
            for server in self._servers:
                server._dn_balancer = None
                server._dn_guard.on_count = None  # one guard for all of them
            balancer.stop()
        servers, self._servers = self._servers, []
        self.listening = []
        for server in servers:
            server.shutdown()

    def connections_by_process(self) -> list[tuple[int, int]] | None:
        """(board row, open connections) of each receiving process on this host, from the
        receivers' board; None with one receiving process (no board)."""
        balancer = self._balancer
        if balancer is None:
            return None
        try:
            return [(row, connections) for row, _pid, connections in balancer.board.rows()]
        except ValueError:  # the board closed: we stop
            return None

    def open_associations(self) -> int:
        """Associations established on this process and not yet closed."""
        with self._tally_lock:
            return len(self._tallies)

    # -- association policy -----------------------------------------------------------

    def commitment_peer(self, calling_ae: str, peer_host: str | None) -> bool:
        """Is this a destination the node asks for storage commitment (AE title and host)?"""
        for destination in self.config.destinations.values():
            if destination.storage_commitment and destination.ae_title == calling_ae:
                if peer_host is None or self.host_names.matches(destination.host, peer_host):
                    return True
        return False

    def archive_peer(self, calling_ae: str, peer_host: str) -> bool:
        """Is this a DICOM archive of [archives] (AE title and host), sending what we moved?"""
        name = self.config.archive_of(calling_ae)
        host = self.config.archives[name].host if name is not None else None
        return host is not None and self.host_names.matches(host, peer_host)

    def prior_source(self, calling_ae: str, request: Any) -> str | None:
        """The archive a C-STORE comes from when it is a sub-operation of our own C-MOVE."""
        originator = str(getattr(request, "MoveOriginatorApplicationEntityTitle", None) or "").strip()
        if originator != self.config.node.ae_title:
            return None
        return self.config.archive_of(calling_ae)

    def caller_allowed(self, calling_ae: str, peer_host: str) -> tuple[bool, str | None]:
        caller = self.config.caller(calling_ae)
        if caller is None:
            if (
                self.config.receiver.require_known_callers
                and not (self.commitment_reports is not None and self.commitment_peer(calling_ae, peer_host))
                and not self.archive_peer(calling_ae, peer_host)
            ):
                return False, f"calling AE {calling_ae!r} is not on the allow-list"
            return True, None
        if caller.hosts and not self.host_names.any_matches(caller.hosts, peer_host):
            return False, f"calling AE {calling_ae!r} is not allowed from host {peer_host}"
        return True, None

    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive  # A-ASSOCIATE-RQ; titles are not copied over yet
        calling_ae = str(request.calling_ae_title).strip()
        called_ae = str(request.called_ae_title).strip()
        peer_host = assoc.requestor.address
        ok, why = self.caller_allowed(calling_ae, peer_host)
        alert = "unauthorized-node"
        if ok:
            # A caller bound to a client certificate must present it (over TLS: on the
            # plain port it is refused, being configured to use TLS).
            caller = self.config.caller(calling_ae)
            why = None if caller is None else certificate_problem(caller, peer_certificate(assoc))
            if why is None:
                # Before the A-ASSOCIATE-AC goes out: the DUL thread may read the first
                # data set before this thread has run the EVT_ESTABLISHED handlers.
                self._stage_data_sets(assoc, calling_ae)
                return
            alert = "node-authentication"
        assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_USER, _CALLING_AE_NOT_RECOGNISED)
        # As pynetdicom's own rejection path does: let the DUL send the A-ASSOCIATE-RJ
        # and see the connection closed before the socket is shut.
        assoc.kill()
        log.warning("association from %s@%s rejected: %s", calling_ae, peer_host, why)
        self.audit.record(
            AuditEvent.ASSOCIATION_REJECTED,
            Outcome.MINOR_FAILURE,
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_host=peer_host,
            reason=why,
        )
        self.audit.record(
            AuditEvent.SECURITY_ALERT,
            Outcome.MINOR_FAILURE,
            calling_ae=calling_ae,
            peer_host=peer_host,
            alert=alert,
            reason=why,
        )

    def on_established(self, event: Any) -> None:
        assoc = event.assoc
        calling_ae = str(assoc.requestor.ae_title).strip()
        peer_host = assoc.requestor.address
        called_ae = str(assoc.requestor.primitive.called_ae_title).strip()
        with self._tally_lock:
            self._tallies[id(assoc)] = _AssociationTally(calling_ae, peer_host, called_ae)
        # Over TLS the record says so, with the certificate the peer authenticated with.
        presented = peer_certificate(assoc)
        tls: dict[str, Any] = (
            {}
            if presented is None
            else {
                "tls": True,
                "certificate_sha256": presented.sha256,
                "certificate_subject": ", ".join(presented.common_names) or None,
            }
        )
        if self.config.node.receivers > 1:
            tls["receiver_pid"] = os.getpid()  # which of the receiving processes took it
        self.audit.record(
            AuditEvent.ASSOCIATION_ACCEPTED,
            calling_ae=calling_ae,
            called_ae=str(assoc.acceptor.ae_title).strip(),
            peer_host=peer_host,
            max_pdu=assoc.requestor.maximum_length,
            **tls,
        )

    def _stage_data_sets(self, assoc: Any, calling_ae: str) -> None:
        """Write this association's C-STORE data sets to disk while they arrive
        (:mod:`dicom_node.ingest.staging`); the DIMSE layer calls ``assoc._dn_stage``, in
        the DUL thread. Installed when the request passes the node's checks, before the
        contexts are negotiated: the stager and the accepted contexts are taken at the
        first data set (which can only come after the A-ASSOCIATE-AC)."""
        syntaxes: dict[int, str] = {}

        def stage(command_set: Any, context_id: int) -> StagedDataSet | None:
            stager = getattr(assoc, "_dn_stager", None)
            if stager is None:
                syntaxes.update(
                    {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
                )
                stager = assoc._dn_stager = self.store.stager()
            syntax = syntaxes.get(context_id)
            if syntax is None:
                return None
            try:
                gap = len(
                    encode_file_meta(
                        str(command_set.AffectedSOPClassUID).strip("\0 "),
                        str(command_set.AffectedSOPInstanceUID).strip("\0 "),
                        syntax,
                        calling_ae,
                        self.prior_source(calling_ae, command_set),
                    )
                )
            except (AttributeError, ValueError, UnicodeError):  # the handler refuses it later
                return None
            return stager.start(gap)

        assoc._dn_stage = stage
        assoc._dn_limits = DataSetLimits(
            max_bytes=self.config.receiver.max_dataset_mb * 1024 * 1024,
            has_room=self.disk.has_room if self.disk.min_free else None,
        )

    def on_connection_closed(self, event: Any) -> None:
        """Staging files of data sets that never completed (an abort, a dropped connection)."""
        stager = getattr(event.assoc, "_dn_stager", None)
        if stager is not None:
            stager.discard_all()

    def on_closed(self, event: Any) -> None:
        self.on_connection_closed(event)
        with self._tally_lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:
            return
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        self.audit.record(
            AuditEvent.ASSOCIATION_CLOSED,
            Outcome.SUCCESS if how == "released" else Outcome.MINOR_FAILURE,
            calling_ae=tally.calling_ae,
            called_ae=self.config.node.ae_title,
            peer_host=tally.peer_host,
            how=how,
            instances={k: v for k, v in tally.counts.items()},
        )
        # PS3.15 "DICOM Instances Transferred": one record per study per association.
        for study_uid, sops in tally.studies.items():
            self.audit.record(
                AuditEvent.INSTANCES_TRANSFERRED,
                study_uid=study_uid,
                patient_id=tally.patient_by_study.get(study_uid),
                calling_ae=tally.calling_ae,
                called_ae=self.config.node.ae_title,
                peer_host=tally.peer_host,
                direction="received",
                instances=len(sops),
            )

    # -- DIMSE ------------------------------------------------------------------------

    def on_echo(self, event: Any) -> int:
        return 0x0000

    def _out_of_resources(
        self, calling_ae: str | None, peer_host: str | None, claimed_uid: str, reason: str, counted: str
    ) -> Taken:
        """Audit a refusal the node caused (disk floor, storage failure): 0xA700."""
        self.audit.record(
            AuditEvent.INSTANCE_REJECTED,
            Outcome.SERIOUS_FAILURE,
            calling_ae=calling_ae,
            peer_host=peer_host,
            sop_uid=claimed_uid,
            status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}",
            reason=reason,
        )
        return Taken(StoreStatus.OUT_OF_RESOURCES, reason, counted=counted)

    def on_store(self, event: Any) -> int | Dataset:
        """Store one instance; a refusal answers its status with the reason as Error Comment."""
        staged = event.request.DataSet if isinstance(event.request.DataSet, StagedDataSet) else None
        try:
            return self._store(event, staged)
        finally:
            if staged is not None:
                staged.discard()  # refused, a duplicate, or failed: its staging file goes

    def _store(self, event: Any, staged: StagedDataSet | None) -> int | Dataset:
        assoc = event.assoc
        calling_ae = str(assoc.requestor.ae_title).strip()
        peer_host = assoc.requestor.address
        request = event.request
        # A C-STORE request pynetdicom would have dropped (net.dimse_guard): refused below.
        defect = command_defect(request)
        claimed_uid = defect.claimed_sop_uid if defect else str(request.AffectedSOPInstanceUID or "")
        tally = self._tallies.get(id(assoc))
        taken = self.take(
            lambda: event.encoded_dataset(include_meta=False),
            str(UID(event.context.transfer_syntax)),
            claimed_uid=claimed_uid,
            calling_ae=calling_ae,
            peer_host=peer_host,
            called_ae=tally.called_ae if tally else None,
            retrieved_from=None if defect else self.prior_source(calling_ae, request),
            staged=staged,
            rejection=None if defect is None else _rejection_of(defect),
        )
        if tally and taken.counted != "failed":  # a storage failure is not counted
            tally.counts[taken.counted] += 1
            if (
                taken.result is not None
                and taken.result.facts is not None
                and taken.status == StoreStatus.SUCCESS
            ):
                facts = taken.result.facts
                tally.studies.setdefault(facts.study_uid, set()).add(facts.sop_instance_uid)
                tally.patient_by_study[facts.study_uid] = facts.patient_id
        if taken.status != StoreStatus.SUCCESS:
            return failure_status(taken.status, taken.reason or "refused")
        return StoreStatus.SUCCESS

    def take(
        self,
        data_of: Callable[[], bytes],
        transfer_syntax: str,
        *,
        claimed_uid: str,
        calling_ae: str | None,
        peer_host: str | None,
        called_ae: str | None = None,
        retrieved_from: str | None = None,
        staged: StagedDataSet | None = None,
        rejection: Rejection | None = None,
    ) -> Taken:
        """One received data set, whatever carried it (C-STORE, STOW-RS): the disk floor,
        then the store's checks, dedup and versioning, durable before this returns; a
        refusal is audited and quarantined as the store decides. ``data_of`` gives the
        encoded data set (not read when the disk is below its floor); ``rejection``: the
        carrier already refuses it (a malformed C-STORE request, net.dimse_guard; a STOW-RS
        part that is no DICOM file): quarantined and audited as such."""
        if not self.disk.has_room():
            free_mb = self.disk.free_bytes() // (1024 * 1024)
            reason = f"free disk {free_mb} MB below the configured floor"
            log.error("refusing instance %s from %s: %s", claimed_uid, calling_ae, reason)
            return self._out_of_resources(calling_ae, peer_host, claimed_uid, reason, "refused")
        try:
            data = data_of()
            if rejection is not None:
                result = self.store.refuse(
                    data,
                    transfer_syntax,
                    rejection,
                    claimed_sop_uid=claimed_uid,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                )
            else:
                result = self.store.accept(
                    data,
                    transfer_syntax,
                    claimed_sop_uid=claimed_uid,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    called_ae=called_ae,
                    max_inflated_bytes=self.config.receiver.max_inflated_mb * 1024 * 1024,
                    retrieved_from=retrieved_from,
                    staged=staged,
                )
        except Exception as exc:  # disk or database failure: nothing acknowledged
            log.exception("storing %s from %s failed", claimed_uid, calling_ae)
            # A database error's message quotes the row (names included): the type only.
            reason = f"storage failure: {describe_exception(exc)}"
            return self._out_of_resources(calling_ae, peer_host, claimed_uid, reason, "failed")
        if result.outcome == StoreOutcome.REJECTED:
            assert result.rejection is not None
            self.audit.record(
                AuditEvent.INSTANCE_QUARANTINED,
                Outcome.MINOR_FAILURE,
                calling_ae=calling_ae,
                peer_host=peer_host,
                sop_uid=claimed_uid,
                status=f"0x{result.rejection.status:04X}",
                reason=result.rejection.reason,
                quarantine_path=str(result.quarantine_path),
            )
            return Taken(result.rejection.status, result.rejection.reason, result, result.outcome.value)
        facts = result.facts
        assert facts is not None
        log.debug(
            "stored %s (study %s) from %s@%s: %s",
            facts.sop_instance_uid,
            facts.study_uid,
            calling_ae,
            peer_host,
            result.outcome.value,
        )
        if result.outcome == StoreOutcome.DUPLICATE:
            # Stored and new-version instances are audited by the indexer with their row;
            # duplicates ride along in its next batch (kept off the C-STORE round trip).
            self.store.indexer.submit_audit(
                AuditEvent.INSTANCE_DUPLICATE,
                {
                    "study_uid": facts.study_uid,
                    "patient_id": facts.patient_id,
                    "calling_ae": calling_ae,
                    "peer_host": peer_host,
                    "sop_uid": facts.sop_instance_uid,
                    "version": result.version,
                    "duplicate": result.duplicate_of,
                    **({"role": result.role} if result.role else {}),
                },
            )
        return Taken(StoreStatus.SUCCESS, None, result, result.outcome.value)

    def on_event_report(self, event: Any) -> tuple[int, None]:
        """A storage commitment result from a destination, on an association it opened."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        peer_host = event.assoc.requestor.address
        if self.commitment_reports is None or str(event.request.AffectedSOPClassUID) != PUSH_MODEL:
            return ReportStatus.PROCESSING_FAILURE, None
        why = None
        if not self.commitment_peer(calling_ae, peer_host):
            why = f"{calling_ae}@{peer_host} is not a destination this node asks for storage commitment"
        else:
            try:
                report: CommitmentReport = parse_event_report(event.event_type, event.event_information)
            except CommitmentReportError as exc:
                why = str(exc)
            except Exception as exc:  # an undecodable data set is the peer's problem, not a crash
                why = f"the report cannot be decoded: {exc}"
        if why is not None:
            log.warning("N-EVENT-REPORT from %s@%s refused: %s", calling_ae, peer_host, why)
            self.audit.record(
                AuditEvent.STORAGE_COMMITMENT_RESULT,
                Outcome.MINOR_FAILURE,
                calling_ae=calling_ae,
                called_ae=self.config.node.ae_title,
                peer_host=peer_host,
                result="ignored",
                reason=why,
                via="new-association",
            )
            return ReportStatus.PROCESSING_FAILURE, None
        status = self.commitment_reports(
            report, reported_by=calling_ae, peer_host=peer_host, via="new-association"
        )
        return int(status), None


#: Refusal reasons (``ingest.instance`` and ``ingest.encoding``, ``net.dimse_guard``, the disk
#: guard, a storage failure) whose parts are all the node's own words, counts, tags, tag
#: keywords, VR codes and UID digits (or transfer syntax names, dropped), each with its short form
#: for the Error Comment. Any other reason is cut to its category: its detail may quote the
#: data set (a library's message, a value that is not a UID). A short form cut at 64
#: characters ends in "...".
_MISSING = r"required attribute missing: ([A-Za-z]+(?:, [A-Za-z]+)*)"
_TAG = r"(\([0-9A-F]{4},[0-9A-F]{4}\))"
#: ``ingest.encoding``: "not encoded as <transfer syntax name>: <detail>"; the detail is kept.
_NOT_ENCODED_AS = r"not encoded as [^:]+: "
_ENCODING_DETAILS = (
    "explicit VR data set on an implicit VR context",
    "native pixel data, the transfer syntax needs it encapsulated",
    "encapsulated pixel data, the transfer syntax needs it native",
    "pixel data has no Basic Offset Table item",
    "pixel data has no fragment after its Basic Offset Table",
)
_SHORT_REASONS = tuple(
    (re.compile(pattern), short)
    for pattern, short in (
        (_MISSING, "required attribute missing: {}|missing: {}"),
        (
            r"SOP Instance UID in the data set differs from the C-STORE request",
            "SOP Instance UID differs from the C-STORE request",
        ),
        (
            r"pixel data truncated: (\d+) bytes, image attributes need (\d+)",
            "pixel data truncated: {} of {} bytes",
        ),
        (
            r"cannot parse data set: element (\([0-9A-F]{4},[0-9A-F]{4}\)) "
            r"needs (\d+) more bytes than were sent",
            "data set truncated: element {} lacks {} bytes",
        ),
        (
            r"cannot parse data set: (\d+) trailing bytes do not form a complete element",
            "cannot parse data set: {} trailing bytes",
        ),
        (r"cannot parse data set: no elements", "cannot parse data set: no elements"),
        (r"invalid UID '([0-9.]*)'", "invalid UID {}"),
        (r"free disk (\d+) MB below the configured floor", "free disk {} MB below the configured floor"),
        (
            _NOT_ENCODED_AS + rf"element {_TAG} has no valid VR, the data set reads as implicit VR",
            "implicit VR data set on an explicit VR context",
        ),
        (_NOT_ENCODED_AS + rf"element {_TAG} has no valid VR", "not explicit VR: element {} has no valid VR"),
        *((_NOT_ENCODED_AS + re.escape(detail), detail) for detail in _ENCODING_DETAILS),
        (
            _NOT_ENCODED_AS + rf"pixel data holds {_TAG} where a fragment item belongs",
            "pixel data holds {} where a fragment item belongs",
        ),
        (
            _NOT_ENCODED_AS + r"pixel data item (\d+) has undefined length",
            "pixel data item {} has undefined length",
        ),
        (
            _NOT_ENCODED_AS + rf"element {_TAG} has undefined length but VR ([A-Z]{{2}})",
            "element {} has undefined length but VR {}",
        ),
        (
            _NOT_ENCODED_AS + rf"element {_TAG} holds {_TAG} where an item belongs",
            "element {} holds {} where an item belongs",
        ),
        (_NOT_ENCODED_AS + rf"item tag {_TAG} outside a sequence", "item tag {} outside a sequence"),
        (
            r"deflated data set inflates past the configured limit of ([\d.]+) MB",
            "deflated data set inflates past the configured limit of {} MB",
        ),
        (
            r"deflated data set inflates past (\d+) bytes: "
            r"its image attributes declare (\d+) pixel bytes, and the margin for the rest is [\d.]+ MB",
            "deflated data set inflates past {} bytes, pixels need {}"
            "|deflated data set inflates past its declared size",
        ),
        (
            r"cannot parse data set: the deflate stream (is invalid|ends early)",
            "cannot parse data set: the deflate stream {}",
        ),
        (
            r"C-STORE request has (no|an invalid) "
            r"(Affected SOP Class UID|Affected SOP Instance UID|Priority)",
            "C-STORE request has {} {}",
        ),
        (r"C-STORE request has no data set", "C-STORE request has no data set"),
        (r"storage failure: (\w+)\b.*", "storage failure: {}"),
    )
)
_LO_MAX = 64


def error_comment(reason: str) -> str:
    """The Error Comment (0000,0902) for a refusal: its reason, short (LO, at most 64
    characters) and free of patient data (see ``_SHORT_REASONS``)."""
    for pattern, short in _SHORT_REASONS:
        if found := pattern.fullmatch(reason):
            forms = [form.format(*found.groups()) for form in short.split("|")]
            text = next((form for form in forms if len(form) <= _LO_MAX), forms[0])
            break
    else:
        text = re.split(r"[:'\"]", reason, maxsplit=1)[0].strip() or "refused"
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _rejection_of(defect: CommandDefect) -> Rejection:
    """A malformed C-STORE request's refusal: its UID breaks the rules, or it cannot be read."""
    status = (
        StoreStatus.INVALID_SOP_INSTANCE if defect.invalid_sop_instance_uid else StoreStatus.CANNOT_UNDERSTAND
    )
    return Rejection(status, defect.reason)


def failure_status(status: int, reason: str) -> Dataset:
    """A C-STORE failure response: the status, the reason as Error Comment and, for missing
    attributes, their tags as Offending Element (0000,0901)."""
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = error_comment(reason)
    if missing := re.fullmatch(_MISSING, reason):
        tags = [tag_for_keyword(keyword) for keyword in missing.group(1).split(", ")]
        if all(tag is not None for tag in tags):
            response.OffendingElement = tags
    return response


class _SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other receiving processes of the node share: every
    socket on it sets SO_REUSEPORT, and the kernel spreads new connections over them."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _start_shared_server(
    ae: AE, address: tuple[str, int], handlers: Any, ssl_context: ssl.SSLContext | None
) -> ThreadedAssociationServer:
    """``ae.start_server(block=False)`` with a :class:`_SharedPortServer`."""
    server = ae.make_server(
        address, evt_handlers=handlers, ssl_context=ssl_context, server_class=_SharedPortServer
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}", daemon=True
    )
    thread.start()
    # as start_server does: the AE counts its associations over its servers
    # (maximum_associations) and shuts them down with it
    ae._servers.append(server)
    return server
