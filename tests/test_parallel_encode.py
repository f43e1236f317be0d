"""The encode helper process (pipelines.parallel): the derived series written beside the
maps, with the same files as when the worker writes everything itself; a spill file
crosses as a reference, not as its bytes; the work's own errors reach the caller as they
would without the helper; a helper that died leaves the job's outputs complete."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from pipelines import parallel, spill
from pipelines.encode import write_outputs
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from tests.test_writers import MODEL_CARD, PROVENANCE, fake_outputs, simulated_ct

#: Elements that say when an object was made: they differ between any two runs.
_WHEN = {"DA", "TM", "DT"}
#: Dimension Organization UID: highdicom makes a new one for every multi-frame object.
_RANDOM = {0x00209164}


@pytest.fixture(scope="module")
def helper() -> Iterator[None]:
    assert parallel.start()
    yield
    parallel.stop()


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return simulated_ct(tmp_path_factory.mktemp("ct"))


def _write(volume: Volume, out_dir: Path, derived: np.ndarray | None = None) -> list[str]:
    fake_derived, sigma, score, mask = fake_outputs(volume)
    written = write_outputs(
        volume,
        provenance=PROVENANCE,
        uids=UidFactory("2.25.", "job-parallel"),
        derived=fake_derived if derived is None else derived,
        uncertainty=sigma,
        hallucination=score,
        suspect=mask,
        model_card=MODEL_CARD,
        qc={"suspect voxels": (float(mask.sum()), "{voxels}")},
        gate="release",
        derived_description="denoised CT",
        out_dir=out_dir,
        release_pixels=True,
    )
    return [str(ds.SOPInstanceUID) for ds in written.datasets()]


def _contents(out_dir: Path) -> dict[str, list[tuple[str, object]]]:
    """Each file's elements (nested ones through their sequences), without the times."""

    def flat(ds: pydicom.Dataset) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for elem in ds:
            if elem.VR in _WHEN or elem.tag in _RANDOM:
                continue
            if elem.VR == "SQ":
                out += [(f"{elem.tag}[{i}]", tuple(flat(item))) for i, item in enumerate(elem.value)]
            else:
                out.append((str(elem.tag), elem.value))
        return out

    return {p.name: flat(pydicom.dcmread(p)) for p in sorted(out_dir.glob("*.dcm"))}


def test_a_spill_file_crosses_as_its_path(tmp_path: Path) -> None:
    store = spill.Spill(tmp_path)
    array = store.array("restored", (40, 128, 128))
    array[:] = np.arange(array.size, dtype=np.float32).reshape(array.shape)
    payload = parallel._dumps(array)
    assert len(payload) < 1000  # 2.6 MB of values: sent as a reference
    again = pickle.loads(payload)
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again, array)
    # a view of a mapping is not the mapping: its own values cross
    view = array[3:5]
    assert len(parallel._dumps(view)) > view.nbytes
    np.testing.assert_array_equal(pickle.loads(parallel._dumps(view)), view)


def test_an_array_in_memory_too_large_is_not_sent(helper: None) -> None:
    big = np.zeros(parallel.MAX_PAYLOAD // 4 + 1024, np.float32)
    assert parallel.submit(np.sum, big) is None
    future = parallel.submit(np.sum, big[:10] + 1)
    assert future is not None and parallel.result(future, lambda: -1.0) == 10.0


def test_the_helper_writes_the_same_files(helper: None, volume: Volume, tmp_path: Path) -> None:
    serial_dir, helper_dir = tmp_path / "serial", tmp_path / "helper"
    executor, parallel._executor = parallel._executor, None  # the worker alone
    try:
        serial = _write(volume, serial_dir)
    finally:
        parallel._executor = executor
    calls: list[Any] = []
    fell_back: list[int] = []
    original = parallel.result

    def watched(future: Any, fallback: Any) -> Any:
        calls.append(future)

        def noted() -> Any:
            fell_back.append(1)
            return fallback()

        return original(future, noted)

    parallel.result = watched
    try:
        beside = _write(volume, helper_dir)
    finally:
        parallel.result = original
    assert len(calls) == 1 and not fell_back  # the derived series was written by the helper
    assert beside == serial  # the same objects, in the same order
    assert _contents(helper_dir) == _contents(serial_dir)
    assert len(list(helper_dir.glob("*.dcm"))) == volume.array.shape[0] + 5


def test_an_error_in_the_work_reaches_the_caller(helper: None, volume: Volume, tmp_path: Path) -> None:
    derived = fake_outputs(volume)[0]
    derived[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite") as raised:
        _write(volume, tmp_path / "out", derived)
    assert type(raised.value.__cause__).__name__ == "_RemoteTraceback"  # raised in the helper


def test_a_failure_here_waits_for_the_helper(
    helper: None, volume: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The maps fail while the helper writes the derived series: the error is raised only
    once the helper is done, so nothing writes into the failed job afterwards."""
    import pipelines.encode as encode

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(encode.UncertaintyMapWriter, "write", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        _write(volume, out)
    derived = sorted(out.glob("S000901_CT_*.dcm")) or sorted(out.glob("S001001_CT_*.dcm"))
    assert len(derived) == volume.array.shape[0]
    assert not list(out.glob("*.part"))


def test_a_helper_that_died_leaves_the_outputs_complete(helper: None, volume: Volume, tmp_path: Path) -> None:
    executor = parallel._executor
    assert executor is not None
    for process in list(executor._processes.values()):
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
    time.sleep(0.5)
    uids = _write(volume, tmp_path / "out")
    assert len(uids) == volume.array.shape[0] + 5
    assert len(list((tmp_path / "out").glob("*.dcm"))) == len(uids)
    deadline = time.monotonic() + 60
    while (parallel._executor is None or parallel._executor is executor) and time.monotonic() < deadline:
        time.sleep(0.1)  # a new helper is started for the next job
    assert parallel.started() and parallel._executor is not executor


def _helper_pids() -> list[int]:
    executor = parallel._executor
    assert executor is not None
    return [int(process.pid or 0) for process in executor._processes.values()]


def test_the_helper_outlives_the_thread_that_started_it() -> None:
    """The worker starts it from its preload thread, which ends once the models are loaded
    (a helper tied to that thread, as PR_SET_PDEATHSIG ties it, died right then)."""
    parallel.stop()
    starter = threading.Thread(target=parallel.start)
    starter.start()
    starter.join()
    try:
        (pid,) = _helper_pids()
        time.sleep(1.5)
        os.kill(pid, 0)  # still there
        future = parallel.submit(sum, [1, 2, 3])
        assert future is not None and parallel.result(future, lambda: -1) == 6
        assert _helper_pids() == [pid]
    finally:
        parallel.stop()


def test_the_helper_ends_when_its_worker_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from pipelines import parallel
        if __name__ == "__main__":
            parallel.start()
            print(*[p.pid for p in parallel._executor._processes.values()], flush=True)
            time.sleep(600)
        """
    )
    (tmp_path / "worker.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    worker = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert worker.stdout is not None
        pid = int(worker.stdout.readline())
        os.kill(pid, 0)
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # gone (and reaped by init)
        time.sleep(0.1)
    pytest.fail(f"helper {pid} still runs 10 s after its worker was killed")


def _tables_loaded() -> int:
    """In the helper: whether highdicom's largest table (62 MB of objects) was loaded."""
    from highdicom import _standard_utils

    return _standard_utils.get_module_attribute_map.cache_info().currsize


def test_the_helper_takes_the_workers_answers_instead_of_the_tables(volume: Volume, tmp_path: Path) -> None:
    from highdicom import _standard_utils

    from pipelines.writers.common import pixel_data_answers, warm_up

    warm_up()  # as the worker's preload: the CT and MR answers are known here
    answers = pixel_data_answers()
    for sop_class, answer in answers.items():  # highdicom's own answers
        assert answer == _standard_utils.does_iod_have_pixel_data(sop_class)
    parallel.stop()
    assert parallel.start()
    try:
        _write(volume, tmp_path / "out")
        future = parallel.submit(_tables_loaded)
        assert future is not None and parallel.result(future, lambda: -1) == 0
    finally:
        parallel.stop()
