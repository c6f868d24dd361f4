"""The kinds registry: the built-in kinds, the modules they name, and a fourth kind added from outside."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core import kinds
from core.errors import ConfigError, RepositoryError
from core.kinds import KINDS, DeployRule, Kind, RuntimeFile, TritonModel, kind, register_kind, runtime_source
from serving.client import config_from_pbtxt
from serving.pbtxt import (
    BackboneConfig,
    ClassifierConfig,
    DetectorConfig,
    SegmenterConfig,
    render_backbone,
    render_classifier,
    render_python,
    render_segmenter,
)
from serving.repository import ModelCard, ModelRepository, runtime_files
from tests.conftest import free_port


def test_the_built_in_kinds_say_what_they_answer_and_how_they_are_judged() -> None:
    assert set(KINDS) >= {"detector", "backbone", "classifier", "segmenter"}
    assert kind("detector").control_tags == ("RectangleLabels",)
    assert kind("backbone").control_tags == ()
    assert kind("classifier").control_tags == ("Choices",)
    assert kind("segmenter").control_tags == ("BrushLabels", "KeyPointLabels")
    metrics = {name: kind(name).metric for name in ("detector", "backbone", "classifier", "segmenter")}
    assert metrics == {"detector": "map50", "backbone": None, "classifier": "macro_f1", "segmenter": "miou"}
    rule = kind("classifier").rule
    assert rule is not None and (rule.retrain_below, rule.retrain_delta, rule.deploy_margin) == (0.60, -0.03, 0.02)


def test_the_detector_rule_defaults_are_the_trainers() -> None:
    from trainer.rules import Rules

    defaults = Rules()
    assert kind("detector").rule == DeployRule(
        "map50", defaults.retrain_below_map50, defaults.retrain_delta_map50, defaults.deploy_margin_map50
    )


def test_every_module_an_available_kind_names_exists_and_unavailable_kinds_name_none(announced_kind: str) -> None:
    for entry in KINDS.values():
        if entry.available:
            assert entry.runtime and entry.client, entry.name
            for role, module in entry.modules().items():
                assert runtime_source(module).is_file(), f"{entry.name} {role}: {module}"
            module, _, cls = (entry.client or "").rpartition(".")
            assert cls in runtime_source(module).read_text(), entry.client
        else:
            assert entry.modules() == {} and not entry.triton_models, entry.name
    assert [f.name for f in kind("detector").runtime if f.name == "model.py"] == ["model.py"]
    assert sorted(k.name for k in KINDS.values() if k.available) == ["backbone", "classifier", "detector", "segmenter"]


def _tensors(text: str) -> tuple[set[str], set[str], set[str]]:
    config = config_from_pbtxt(text)
    required = {i["name"] for i in config["input"] if not i.get("optional")}
    optional = {i["name"] for i in config["input"] if i.get("optional")}
    return required, optional, {o["name"] for o in config["output"]}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("detector", render_python(DetectorConfig())),
        ("backbone", render_backbone(BackboneConfig())),
        ("classifier", render_classifier(ClassifierConfig("cls", "dinov3", ("a", 'b "quoted"')))),
        ("segmenter", render_segmenter(SegmenterConfig("seg", "dinov3", ("crack",)))),
    ],
)
def test_the_registry_tensor_names_are_those_the_triton_config_declares(name: str, text: str) -> None:
    (model,) = kind(name).triton_models
    assert _tensors(text) == (set(model.inputs), set(model.optional_inputs), set(model.outputs))


def test_the_classifier_config_carries_what_the_bridge_routes_by() -> None:
    config = config_from_pbtxt(render_classifier(ClassifierConfig("cls", "dinov3", ("a", 'b "quoted"'))))
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["labelloop_kind"] == "classifier" and params["backbone"] == "dinov3"
    assert json.loads(params["classes"]) == ["a", 'b "quoted"']


def test_an_unknown_kind_is_a_clear_error(announced_kind: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown model kind 'pose'; known: announced, backbone, classifier"):
        kind("pose")
    with pytest.raises(RepositoryError, match="no Triton runtime for model kind 'pose'; kinds with one: backbone"):
        runtime_files("pose")
    with pytest.raises(RepositoryError, match=r"no Triton runtime for model kind 'announced' \(it has none yet\)"):
        runtime_files(announced_kind)


def test_a_taken_name_needs_replace() -> None:
    assert register_kind(kind("detector")) is kind("detector")  # the same entry again changes nothing
    with pytest.raises(ConfigError, match="'detector' is registered already"):
        register_kind(Kind(name="detector", control_tags=(), triton_models=(), rule=None))


def test_each_kind_gets_its_own_client_class(announced_kind: str) -> None:
    from serving.backbone import FeaturesClient
    from serving.client import DetectorClient
    from serving.control import kind_client
    from serving.heads import ClassifierClient, SegmenterClient

    async def classes() -> list[type]:
        found = []
        for name in ("detector", "backbone", "classifier", "segmenter"):
            client = kind_client(name, "127.0.0.1:1", "m", timeout_s=1.0)
            found.append(type(client))
            await client.close()
        return found

    assert asyncio.run(classes()) == [DetectorClient, FeaturesClient, ClassifierClient, SegmenterClient]
    with pytest.raises(RepositoryError, match="m is a announced, which labelloop cannot serve yet"):
        kind_client(announced_kind, "127.0.0.1:1", "m")
    with pytest.raises(RepositoryError, match="m: unknown model kind 'pose'"):
        kind_client("pose", "127.0.0.1:1", "m")


# --- a fourth kind, from its own modules only ----------------------------------------------------------

_FAKE_MODEL = '"""A fake kind\'s Triton model: it only has to be copied."""\nfrom counter_ops import count\n'
_FAKE_OPS = "def count(pixels):\n    return len(pixels)\n"


@pytest.fixture
def counter_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kind]:
    """A ``counter`` kind whose runtime is a package written here; unregistered afterwards."""
    package = tmp_path / "src" / "counter_kind"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "triton_model.py").write_text(_FAKE_MODEL)
    (package / "counter_ops.py").write_text(_FAKE_OPS)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    entry = Kind(
        name="counter",
        control_tags=("Number",),
        triton_models=(TritonModel(suffix="", inputs=("IMAGE",), outputs=("COUNT",)),),
        rule=DeployRule("mae"),
        runtime=(
            RuntimeFile("counter_kind.triton_model", "model.py"),
            RuntimeFile("counter_kind.counter_ops", "counter_ops.py"),
            RuntimeFile("core.image_decode", "image_decode.py"),
        ),
    )
    register_kind(entry)
    yield entry
    kinds.KINDS.pop("counter")


def test_a_fourth_kind_is_published_with_its_runtime_and_listed(counter_kind: Kind, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    repo.write_config_text("counter", 'name: "counter"\nbackend: "python"\n')
    card = ModelCard(name="counter", version=0, classes=["item"], imgsz=224, kind="counter", metrics={"mae": 0.5})
    version = repo.add_version(card, onnx)
    folder = repo.version_dir("counter", version)
    assert (folder / "model.py").read_text() == _FAKE_MODEL
    assert (folder / "counter_ops.py").read_text() == _FAKE_OPS
    assert (folder / "image_decode.py").read_bytes() == (
        Path(__file__).parents[2] / "core/image_decode.py"
    ).read_bytes()
    assert repo.kind("counter") == "counter"

    from labelloop.cli import app

    base = ["models", "--model-repository", str(repo.root), "--triton-url", f"127.0.0.1:{free_port()}"]
    result = CliRunner().invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert {k: row[k] for k in ("name", "kind", "version", "served")} == {
        "name": "counter",
        "kind": "counter",
        "version": 1,
        "served": False,
    }
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "counter v1 counter fp32 imgsz 224 ['item'] mae 0.500"
