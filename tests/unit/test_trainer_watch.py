"""``trainer watch`` starts runs from the bridge's stored events: START_TRAINING, or N annotations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.errors import LabelStudioError
from core.events import EventStore
from core.settings import Settings
from trainer import pipeline
from trainer.pipeline import RunOptions, watch


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", model_repository=tmp_path / "repo")


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Projects that a training run was started for (training itself is not under test here)."""
    started: list[int] = []

    def fake_run(settings: Settings, source: Any, options: RunOptions) -> Any:
        started.append(source.project_id)
        return type("Report", (), {"candidate": None, "published_version": None})()

    monkeypatch.setattr(pipeline, "run_training", fake_run)
    return started


def _event(store: EventStore, action: str, project: int = 7, task: int = 1) -> None:
    store.append({"action": action, "project": {"id": project}, "task": {"id": task}, "annotation": {"id": task}})


def _watch(settings: Settings, every: int = 3) -> int:
    return watch(settings, RunOptions.from_settings(settings), every=every, once=True)


def test_start_training_starts_a_run(settings: Settings, runs: list[int]) -> None:
    store = EventStore.for_settings(settings)
    _event(store, "ANNOTATION_CREATED")
    _event(store, "START_TRAINING", project=9)
    assert _watch(settings) == 1
    assert runs == [9]
    assert _watch(settings) == 0, "an event is consumed once"


def test_n_annotations_start_a_run_and_the_count_restarts(settings: Settings, runs: list[int]) -> None:
    store = EventStore.for_settings(settings)
    for task in range(2):
        _event(store, "ANNOTATION_CREATED", task=task)
    _event(store, "ANNOTATIONS_DELETED")
    assert _watch(settings) == 0
    _event(store, "ANNOTATION_UPDATED")
    assert _watch(settings) == 1 and runs == [7]
    for task in range(2):
        _event(store, "ANNOTATION_CREATED", task=task)
    assert _watch(settings) == 0
    state = json.loads((settings.state_dir / "trainer" / "watch.json").read_text())
    assert state["after_id"] == store.last_id() and state["pending"] == {"7": 2}


def test_a_failed_run_is_kept_for_later(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*_: Any) -> Any:
        raise LabelStudioError("Label Studio is down")

    monkeypatch.setattr(pipeline, "run_training", failing)
    _event(EventStore.for_settings(settings), "START_TRAINING")
    assert _watch(settings) == 1
    state = json.loads((settings.state_dir / "trainer" / "watch.json").read_text())
    assert state["requested"] == [7]


def test_a_project_with_a_classifier_session_trains_its_head(
    settings: Settings, runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.session import ClassSpec, Session, record_session
    from trainer import classifier_run

    heads: list[tuple[int, str]] = []

    def fake_head_run(settings: Settings, project: int, session: Session) -> Any:
        heads.append((project, session.model_name))
        return type("Report", (), {"published_version": 2})()

    monkeypatch.setattr(classifier_run, "run", fake_head_run)
    session = Session(kind="classifier", title="Surface", classes=(ClassSpec(name="a"), ClassSpec(name="b")))
    record_session(settings.state_dir, session, 11)
    store = EventStore.for_settings(settings)
    _event(store, "START_TRAINING", project=11)
    _event(store, "START_TRAINING", project=7)
    assert _watch(settings) == 2
    assert heads == [(11, "surface")] and runs == [7], "the session's head for 11, the detector for 7"


def test_after_a_publish_the_watcher_runs_its_follow_up_and_survives_its_failure(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = {7: 3, 8: None, 9: 4}

    def fake_run(settings: Settings, source: Any, options: RunOptions) -> Any:
        return type("Report", (), {"candidate": None, "published_version": published[source.project_id]})()

    monkeypatch.setattr(pipeline, "run_training", fake_run)
    followed: list[int] = []

    def follow_up(project: int) -> None:
        followed.append(project)
        if project == 7:
            raise RuntimeError("Label Studio went away")  # injected: the watcher must go on

    store = EventStore.for_settings(settings)
    for project in published:
        _event(store, "START_TRAINING", project=project)
    runs = watch(settings, RunOptions.from_settings(settings), every=3, once=True, after_publish=follow_up)
    assert runs == 3 and followed == [7, 9], "only runs that published are followed up, a failure stops nothing"
