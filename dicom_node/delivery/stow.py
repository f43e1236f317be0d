"""Delivery by STOW-RS (DICOM PS3.18 10.5) to a ``protocol = "dicomweb"`` destination, with
dicomweb-client: the series goes in requests of ``stow_batch`` instances to
``<dicomweb_url>/studies/<study>``, and it is delivered only when the peer's answers list
every instance in their Referenced SOP Sequence (its confirmation). The outbox does the
rest as for C-STORE: what is retryable (the peer unreachable, 5xx, 429, a timeout, an
out-of-resources Failure Reason) is tried again after the backoff; what is not (401, 403,
404, 400, 415, another Failure Reason) goes to the dead letters with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests

from dicom_node.config import Destination
from dicom_node.delivery.sender import SendReport, status_is_retryable
from dicom_node.net.dicomweb import client_for
from pipelines.base import OutputInstance

#: HTTP answers that may go away by themselves (busy, restarting, a proxy's gateway error).
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def _uids(answer: pydicom.Dataset, keyword: str) -> list[tuple[str, int | None]]:
    found = []
    for item in answer.get(keyword, []) or []:
        reason = item.get("FailureReason")
        found.append(
            (str(item.get("ReferencedSOPInstanceUID", "")), int(reason) if reason is not None else None)
        )
    return found


def _answer_of(response: requests.Response | None) -> pydicom.Dataset:
    """The DICOM JSON body of a STOW-RS error answer (409 lists the failures), if any."""
    if response is None:
        return pydicom.Dataset()
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, AttributeError):  # not DICOM JSON (e.g. a problem text)
        return pydicom.Dataset()


def send_series_stow(destination: Destination, files: Sequence[OutputInstance], home: Path) -> SendReport:
    """Post the series' files and read the peer's confirmation of each."""
    where = f"DICOMweb {destination.dicomweb_url}"
    report = SendReport()
    try:
        client = client_for(destination, home)
    except ValueError as exc:  # a secret file that cannot be read
        report.error = f"{where}: {exc}"
        return report
    for start in range(0, len(files), destination.stow_batch):
        batch = files[start : start + destination.stow_batch]
        datasets = [pydicom.dcmread(f.path) for f in batch]
        study = str(datasets[0].StudyInstanceUID)
        try:
            answer = client.store_instances(datasets, study_instance_uid=study)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            answer = _answer_of(exc.response)
            if not answer.get("FailedSOPSequence"):
                detail = (exc.response.text[:200] if exc.response is not None else "").strip()
                report.error = f"{where} answered HTTP {status}" + (f": {detail}" if detail else "")
                report.retryable = status in _RETRYABLE_HTTP
                return report
        except (requests.ConnectionError, requests.Timeout) as exc:
            report.error = f"{where} cannot be reached: {type(exc).__name__}"
            report.retryable = True
            return report
        except requests.TooManyRedirects:
            report.error = (
                f"{where} answered with a redirect, which is not followed (configure the URL it names)"
            )
            return report
        except requests.RequestException as exc:
            report.error = f"{where}: the request failed ({type(exc).__name__})"
            report.retryable = True
            return report
        confirmed = {uid for uid, _ in _uids(answer, "ReferencedSOPSequence")}
        refused = {uid: reason for uid, reason in _uids(answer, "FailedSOPSequence")}
        for f in batch:
            if f.sop_uid in confirmed:
                report.sent += 1
            elif f.sop_uid in refused:
                reason = refused[f.sop_uid]
                report.failed.append((f.sop_uid, f"0x{reason:04X}" if reason is not None else "failed"))
                report.retryable = report.retryable or (reason is not None and status_is_retryable(reason))
            else:
                report.failed.append((f.sop_uid, "not confirmed in the STOW-RS answer"))
        if report.failed:
            first_uid, first_status = report.failed[0]
            report.error = f"{where} did not store {len(report.failed)} instance(s), first {first_status}"
            return report
    return report
