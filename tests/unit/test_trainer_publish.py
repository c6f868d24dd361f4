"""promote / rollback re-publish earlier artefacts as NEW versions; nothing is rewritten or deleted."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.errors import PublishError
from core.settings import Settings
from serving.publish import detector_config
from serving.repository import ModelCard, ModelRepository
from tests.conftest import free_port
from trainer import cli
from trainer.history import History
from trainer.publish import find_served, promote, rollback


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A repository with versions 1..3 (fake files) and no Triton at the configured address."""
    s = Settings(
        model_repository=tmp_path / "repo", state_dir=tmp_path / "state", triton_url=f"127.0.0.1:{free_port()}"
    )
    repo = ModelRepository(s.model_repository)
    repo.write_config(detector_config(s))
    for v in (1, 2, 3):
        onnx = tmp_path / f"m{v}.onnx"
        onnx.write_bytes(f"onnx {v}".encode())
        weights = tmp_path / f"w{v}.pt"
        weights.write_bytes(f"weights {v}".encode())
        card = ModelCard(
            name=s.model_name,
            version=0,
            classes=["a", "b"],
            imgsz=320,
            parent_version=v - 1 or None,
            metrics={"map50": v / 10},
            dataset_hash=f"d{v}",
            train_args={"epochs": v},
            precision="int8" if v == 2 else "fp32",
            quantization={"agreement": 0.99} if v == 2 else {},
        )
        repo.add_version(card, onnx, weights)
    return s


def _files(repo: ModelRepository, name: str, v: int) -> tuple[bytes, bytes]:
    weights = repo.weights_path(name, v)
    assert weights is not None
    return repo.onnx_path(name, v).read_bytes(), weights.read_bytes()


def test_served_is_the_newest_version_when_triton_is_down(settings: Settings) -> None:
    served = find_served(settings)
    assert served is not None and served.version == 3 and not served.live


def test_rollback_republishes_the_previous_version_as_a_new_one(settings: Settings) -> None:
    repo = ModelRepository(settings.model_repository)
    name = settings.model_name
    before = {v: _files(repo, name, v) for v in (1, 2, 3)}
    new, source, info = rollback(settings)
    assert (new, source, info) == (4, 2, None)
    assert _files(repo, name, 4) == before[2]
    assert {v: _files(repo, name, v) for v in (1, 2, 3)} == before, "history is never rewritten"
    card = repo.card(name, 4)
    assert card.metrics == {"map50": 0.2} and card.dataset_hash == "d2" and "rollback from v3" in card.note
    assert (card.precision, card.quantization) == ("int8", {"agreement": 0.99})

    # rolling back again goes further back, not to the version just rolled back from
    new, source, _ = rollback(settings)
    assert (new, source) == (5, 1)
    assert _files(repo, name, 5) == before[1]
    kinds = [
        (r["kind"], r["source_version"], r["rolled_back_from"])
        for r in History(settings.state_dir / "trainer" / "history.jsonl").records()
    ]
    assert kinds == [("rollback", 2, 3), ("rollback", 1, 4)]

    with pytest.raises(PublishError, match="no earlier version"):
        rollback(settings)


def test_rollback_to_a_named_version(settings: Settings) -> None:
    new, source, _ = rollback(settings, to=1)
    assert (new, source) == (4, 1)


def test_promote_copies_a_version_and_is_a_noop_for_the_served_one(settings: Settings) -> None:
    repo = ModelRepository(settings.model_repository)
    assert promote(settings, 3) == (3, None)
    assert repo.versions(settings.model_name) == [1, 2, 3]
    new, _ = promote(settings, 1)
    assert new == 4 and _files(repo, settings.model_name, 4) == _files(repo, settings.model_name, 1)
    with pytest.raises(PublishError, match="no version 9"):
        promote(settings, 9)


def test_cli_promote_and_rollback(settings: Settings) -> None:
    runner = CliRunner()
    common = ["--model-repository", str(settings.model_repository), "--triton-url", settings.triton_url]
    env = {"LABELLOOP_STATE_DIR": str(settings.state_dir)}
    result = runner.invoke(cli.app, ["rollback", *common], env=env)
    assert result.exit_code == 0, result.output
    assert "v4 re-publishes v2" in result.output
    result = runner.invoke(cli.app, ["promote", "3", *common], env=env)
    assert result.exit_code == 0 and "published v5 as a copy of v3" in result.output
    result = runner.invoke(cli.app, ["promote", "42", *common], env=env)
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_cli_train_needs_exactly_one_source(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli.app, ["train"])
    assert result.exit_code == 1 and "exactly one of --project" in result.output
    result = runner.invoke(cli.app, ["train", "--project", "1", "--export", str(tmp_path)])
    assert result.exit_code == 1


def test_cli_train_reports_a_bad_export_in_one_line(tmp_path: Path) -> None:
    env = {"LABELLOOP_STATE_DIR": str(tmp_path / "state"), "LABELLOOP_MODEL_REPOSITORY": str(tmp_path / "repo")}
    result = CliRunner().invoke(cli.app, ["train", "--export", str(tmp_path / "missing.zip")], env=env)
    assert result.exit_code == 1
    assert result.output.strip() == f"error: no export at {tmp_path / 'missing.zip'}"
