"""A worker builds the pipelines its policy names when it starts (``[workers] preload``):
the first study does not wait for the imports and the model load (issue 20: end to end)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit import AuditEvent
from dicom_node.runtime import Runtime
from dicom_node.worker import Worker


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime.open(None, tmp_path / "home")
    try:
        yield rt
    finally:
        rt.close()


def worker_of(runtime: Runtime, policy: Path | None) -> Worker:
    return Worker(runtime.config, runtime.paths, runtime.db, runtime.audit, "run-w", policy)


def two_rule_policy(path: Path) -> Path:
    rules = [
        {"name": "ldct", "pipeline": "restoration", "destinations": ["pacs"], "match": {"modality": "CT"}},
        {"name": "plain", "pipeline": "forward", "destinations": ["pacs"], "match": {"modality": "MR"}},
    ]
    path.write_text(yaml.safe_dump({"version": 1, "mode": "first-match", "rules": rules}))
    return path


def test_a_worker_builds_its_policys_pipelines_before_its_first_job(runtime: Runtime, tmp_path: Path) -> None:
    worker = worker_of(runtime, two_rule_policy(tmp_path / "p.yaml"))
    assert worker.config.workers.preload  # the default
    worker.preload()
    assert set(worker.runner._pipelines) == {"forward", "restoration"}
    loaded = runtime.audit.events(AuditEvent.MODEL_LOADED)
    assert [e.facts["pipeline"] for e in loaded] == ["restoration"]  # the model, loaded and audited once
    assert worker.runner.pipeline("restoration") is worker.runner._pipelines["restoration"]
    assert len(runtime.audit.events(AuditEvent.MODEL_LOADED)) == 1


def test_a_pipeline_that_cannot_be_built_is_said_and_the_worker_goes_on(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def build(name: str, model_dir: Any = None, precision: str = "auto") -> Any:
        if name == "restoration":
            raise ValueError("the model's weights do not match their recorded hash")
        return object()

    monkeypatch.setattr("dicom_node.jobs.runner.get_pipeline", build)
    worker = worker_of(runtime, two_rule_policy(tmp_path / "p.yaml"))
    with caplog.at_level(logging.INFO, logger="dicom_node.worker"):
        worker.preload()
    assert set(worker.runner._pipelines) == {"forward"}
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "pipeline restoration not built at start" in said and "do not match" in said
    assert "pipeline forward ready in" in said


def test_no_policy_or_an_unreadable_one_builds_nothing(runtime: Runtime, tmp_path: Path) -> None:
    for policy in (None, tmp_path / "missing.yaml"):
        worker = worker_of(runtime, policy)
        worker.preload()
        assert worker.runner._pipelines == {}


def test_a_job_and_the_preload_asking_at_once_build_it_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[str] = []

    def build(name: str, model_dir: Any = None, precision: str = "auto") -> Any:
        builds.append(name)
        time.sleep(0.2)  # long enough for the others to ask meanwhile
        return object()

    monkeypatch.setattr("dicom_node.jobs.runner.get_pipeline", build)
    runner = worker_of(runtime, None).runner
    got: list[Any] = []
    askers = [threading.Thread(target=lambda: got.append(runner.pipeline("forward"))) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert builds == ["forward"] and len(got) == 4 and all(g is got[0] for g in got)


def test_the_dicom_tables_the_writers_read_are_loaded_at_start_too(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from highdicom import _standard_utils

    tables = (
        _standard_utils.get_module_attribute_map,
        _standard_utils.get_iod_module_map,
        _standard_utils.get_sop_class_iod_map,
    )
    for table in tables:
        table.cache_clear()  # as in a fresh worker process
    worker = worker_of(runtime, two_rule_policy(tmp_path / "p.yaml"))
    with caplog.at_level(logging.INFO, logger="dicom_node.worker"):
        worker.preload()
    assert all(table.cache_info().currsize == 1 for table in tables)
    assert any("DICOM writer tables loaded" in r.getMessage() for r in caplog.records)
    # a worker without a policy builds nothing and loads nothing
    for table in tables:
        table.cache_clear()
    worker_of(runtime, None).preload()
    assert all(table.cache_info().currsize == 0 for table in tables)


def test_the_encode_helper_starts_with_the_preload_unless_off(runtime: Runtime, tmp_path: Path) -> None:
    from pipelines import parallel

    policy = two_rule_policy(tmp_path / "p.yaml")
    off = runtime.config.model_copy(
        update={"workers": runtime.config.workers.model_copy(update={"encode_helper": False})}
    )
    parallel.stop()
    Worker(off, runtime.paths, runtime.db, runtime.audit, "run-w", policy).preload()
    assert not parallel.started()
    worker = worker_of(runtime, policy)
    assert worker.config.workers.encode_helper  # the default
    try:
        worker.preload()
        assert parallel.started()
    finally:
        parallel.stop()
