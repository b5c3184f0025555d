"""The journal file: durable appends, replay, a torn tail, compaction, unusable directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spendgate.cli import main
from spendgate.sidecar.journal import FILE_NAME, Journal, JournalError
from tests.support.sidecar_processes import free_port


def charge(request_id: str, cost: int, customer: str = "acme", **more: object) -> dict[str, object]:
    return {"op": "charge", "id": request_id, "customer": customer, "cost": cost, "ts": 1, **more}


def done(request_id: str, customer: str = "acme") -> dict[str, object]:
    return {"op": "done", "id": request_id, "customer": customer}


async def test_appends_are_on_disk_when_acknowledged_and_replayed(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path))
    journal.open()
    await journal.append({"op": "open", "id": "r1", "customer": "acme", "allowance": 50, "ts": 1})
    await journal.append(charge("r1", 30, allowance=30))
    await journal.append(charge("r2", 7))
    lines = (tmp_path / FILE_NAME).read_bytes().splitlines()
    assert [json.loads(line)["v"] for line in lines] == [1, 1, 1]
    journal.close()  # as a kill would leave it: no compaction

    again = Journal(str(tmp_path))
    replay = again.open()
    assert replay.records == 3 and replay.torn_bytes == 0
    assert sorted(again.pending) == ["acme/r1", "acme/r2"]
    assert again.pending["acme/r1"].charge == {"cost": 30, "ts": 1, "allowance": 30}
    assert again.allowance_used == {"acme": 30}  # the cost replaced the bound
    again.close()


async def test_an_open_request_without_its_end_is_interrupted_and_keeps_its_allowance(
    tmp_path: Path,
) -> None:
    journal = Journal(str(tmp_path))
    journal.open()
    await journal.append({"op": "open", "id": "r1", "customer": "acme", "allowance": 50, "ts": 1})
    journal.close()
    again = Journal(str(tmp_path))
    again.open()
    (entry,) = again.pending.values()
    assert entry.interrupted and entry.charge is None
    assert again.allowance_used == {"acme": 50}
    again.close()


async def test_a_torn_last_line_is_ignored_and_cut_complete_ones_kept(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path))
    journal.open()
    await journal.append(charge("r1", 10))
    await journal.append(charge("r2", 20))
    journal.close()
    path = tmp_path / FILE_NAME
    complete = path.read_bytes()
    with path.open("ab") as file:  # killed in the middle of writing the third record
        file.write(b'{"v":1,"op":"charge","id":"r3","cus')
    again = Journal(str(tmp_path))
    replay = again.open()
    assert replay.torn_bytes == len(b'{"v":1,"op":"charge","id":"r3","cus')
    assert sorted(again.pending) == ["acme/r1", "acme/r2"]
    assert path.read_bytes() == complete  # cut: the next record starts on a line of its own
    await again.append(charge("r4", 40))
    again.close()
    third = Journal(str(tmp_path))
    third.open()
    assert sorted(third.pending) == ["acme/r1", "acme/r2", "acme/r4"]
    third.close()


async def test_compaction_keeps_only_what_is_pending(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path), compact_after=50)
    journal.open()
    for index in range(120):
        await journal.append(charge(f"r{index}", 1))
    for index in range(100):
        journal.append_soon(done(f"r{index}"))
    await journal.flush()
    path = tmp_path / FILE_NAME
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    # Compacted after 50 acknowledgements, then 50 more were appended: never unbounded.
    assert len(records) < 120 + 100
    assert journal.size == path.stat().st_size
    journal.close()
    again = Journal(str(tmp_path))
    again.open()
    assert sorted(again.pending) == sorted(f"acme/r{index}" for index in range(100, 120))
    for index in range(100, 120):
        again.append_soon(done(f"r{index}"))
    await again.flush()
    assert path.read_bytes() == b""  # everything acknowledged: compacted to nothing
    assert not (tmp_path / f"{FILE_NAME}.tmp").exists()
    again.close()


def test_a_record_of_a_newer_version_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"v":2,"op":"charge","id":"r1","customer":"acme"}\n')
    with pytest.raises(JournalError, match="version 2; this sidecar reads version 1"):
        Journal(str(tmp_path)).open()


def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError, match=f"journal directory {blocker}/journal is not usable"):
        Journal(str(blocker / "journal")).open()


def test_a_directory_in_use_by_another_sidecar_is_refused(tmp_path: Path) -> None:
    first = Journal(str(tmp_path))
    first.open()
    try:
        with pytest.raises(JournalError, match="in use by another sidecar process"):
            Journal(str(tmp_path)).open()
    finally:
        first.close()
    second = Journal(str(tmp_path))  # released with the first
    second.open()
    second.close()


def test_the_sidecar_exits_1_when_its_journal_directory_is_not_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    listen, probes = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    code = main(
        ["sidecar", "--upstream", "http://127.0.0.1:9", "--listen", listen,
         "--probe-listen", probes, "--fail-mode", "open", "--journal-dir", str(blocker / "j"),
         "--redis", "redis://127.0.0.1:9/0"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert f"spendgate sidecar: journal directory {blocker}/j is not usable" in err


def test_fail_open_without_a_journal_is_a_usage_error() -> None:
    spendgate = Path(sys.executable).parent / "spendgate"
    result = subprocess.run(
        [str(spendgate), "sidecar", "--upstream", "http://m:8000", "--fail-mode", "open"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--fail-mode open needs --journal-dir" in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"), [("1.00", 1_000_000), ("0", 0), ("0.000001", 1), ("2.5", 2_500_000)]
)
def test_fail_open_allowance_is_a_decimal_amount(value: str, expected: int) -> None:
    from spendgate.cli import build_parser
    from spendgate.cli.servers import sidecar_settings_from_args

    ns = build_parser().parse_args(["sidecar", "--upstream", "http://m:1"])
    env = {"SPENDGATE_FAIL_OPEN_ALLOWANCE": value}
    assert sidecar_settings_from_args(ns, env).fail_open_allowance == expected


@pytest.mark.parametrize("value", ["1.0000001", "-1", "1e3", "lots"])
def test_a_bad_fail_open_allowance_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sidecar", "--upstream", "http://m:1", "--fail-open-allowance", value]) == 2
    assert "--fail-open-allowance" in capsys.readouterr().err
