"""``labelloop bench learning``: how many labels active learning saves, simulated on the project's synthetic data.

For each seed, a fixed pool of unlabelled tasks and a fixed held-out set are rendered; a small random
seed set (the same for every strategy within a seed) is labelled and a first model trained on it.
Then, each round, every strategy (:mod:`trainer.selection`) picks ``batch`` more tasks from its own
unlabelled pool by its own current model's scores, the model is retrained on its labelled set with
the real trainer code, and scored on the held-out set:

classifier  synthetic texture classes (``trainer.synthetic_classes``), patch tokens of the demo DINOv3
            backbone (published into a private repository, run by ``trainer.features.LocalBackbone``,
            computed once per image), ``trainer.classify.train_head`` from scratch each round
            (deterministic per seed), task score ``core.uncertainty.margin`` of ``predict_proba``,
            diversity features the mean-pooled tokens; metric held-out macro-F1
            (``classification_metrics``).
detector    synthetic defects (``trainer.synthetic.write_dataset``), ``trainer.train.train_detector``
            (the first model from scratch on the seed set, then each round fine-tunes its strategy's
            previous model, as the trainer fine-tunes the served version), task score the bridge's
            own (``ls_bridge.controls.LabelPlan.format`` on the model's detections), diversity
            features ultralytics' pooled embeddings; metric held-out mAP50 (``trainer.evaluate``).

Reported per strategy: the learning curve (metric vs labels, mean and std over seeds),
``labels_to_target`` (the first label count whose mean reaches the target: ``--target``, else
``TARGET_SHARE`` x the best final mean of any strategy) and ``label_saving`` = 1 - uncertainty's
labels_to_target / random's (null when either never reaches the target). Module-level imports stay
light: ``labelloop --help`` loads this module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError

__all__ = [
    "KINDS",
    "PLANS",
    "TARGET_SHARE",
    "LearningPlan",
    "learning",
    "render_table",
    "run_learning_bench",
    "summarise",
    "write_png",
]

logger = logging.getLogger(__name__)

KINDS = ("classifier", "detector")
METRICS = {"classifier": "macro_f1", "detector": "map50"}
TARGET_SHARE = 0.9
CLASSIFIER_CLASSES = ("scratched", "pitted", "stained", "clean", "cracked", "corroded")
DATA_SEED = 0  # the pool and held-out images are the same for every seed; the seed set differs
_CLASSIFIER_ONLY = ("long_side", "max_epochs")
_DETECTOR_ONLY = ("first_epochs", "epochs", "imgsz")


@dataclass(frozen=True)
class LearningPlan:
    """One simulation's size; ``first_epochs``/``epochs``/``imgsz`` are the detector's, ``long_side``/``max_epochs``
    the classifier's."""

    kind: str
    strategies: tuple[str, ...] = ("random", "uncertainty", "diverse")
    rounds: int = 8
    batch: int = 12
    seeds: int = 5
    initial: int = 12
    pool: int = 300
    held_out: int = 150
    long_side: int = 224
    max_epochs: int = 300
    first_epochs: int = 20
    epochs: int = 5
    imgsz: int = 320
    target: float | None = None


PLANS: dict[tuple[str, bool], LearningPlan] = {
    ("classifier", False): LearningPlan("classifier"),
    ("classifier", True): LearningPlan(
        "classifier", rounds=2, batch=12, seeds=1, initial=12, pool=72, held_out=48, max_epochs=100
    ),
    ("detector", False): LearningPlan(
        "detector",
        rounds=4,
        batch=16,
        seeds=2,
        initial=32,
        pool=160,
        held_out=48,
        first_epochs=40,
        epochs=6,
        imgsz=192,
    ),
    ("detector", True): LearningPlan(
        "detector", rounds=1, batch=8, seeds=1, initial=16, pool=32, held_out=12, first_epochs=2, epochs=1, imgsz=160
    ),
}


# --- the simulation ----------------------------------------------------------------------------------


class _Task:
    """One kind's data, trainer, scorer and metric, behind one interface for the rounds."""

    pool_size: int

    def train(self, labelled: Sequence[int], seed: int, previous: Any, tag: str) -> Any:
        raise NotImplementedError

    def metric(self, model: Any) -> float:
        raise NotImplementedError

    def scores(self, model: Any, indices: Sequence[int], features: bool) -> tuple[Any, Any]:
        """Scores (lower = less sure) of pool ``indices`` and, when asked, their feature rows."""
        raise NotImplementedError


class _ClassifierTask(_Task):
    def __init__(self, plan: LearningPlan, work: Path, stages: dict[str, float]) -> None:
        import numpy as np

        from core.settings import load_settings
        from labelloop.bench_backbone import publish_demo_backbone
        from serving.repository import ModelRepository
        from trainer.features import LocalBackbone
        from trainer.synthetic_classes import write_classifier_dataset

        started = time.perf_counter()
        settings = load_settings()
        repo = ModelRepository(work / "model_repository")
        publish_demo_backbone(settings, repo, work / "backbone", name="learning-backbone")
        stages["backbone_publish_s"] = time.perf_counter() - started

        started = time.perf_counter()
        n = plan.pool + plan.held_out
        out = write_classifier_dataset(work / "classes", n, DATA_SEED, CLASSIFIER_CLASSES)
        meta = json.loads((out / "labels.json").read_text(encoding="utf-8"))
        names = sorted(meta["labels"])
        labels = [CLASSIFIER_CLASSES.index(meta["labels"][name]) for name in names]
        stages["data_s"] = time.perf_counter() - started

        started = time.perf_counter()
        local = LocalBackbone(repo, "learning-backbone")
        tokens = [local.features((out / "images" / name).read_bytes(), plan.long_side) for name in names]
        stages["features_s"] = time.perf_counter() - started
        # The first `pool` images are the pool, the rest the held-out set (the classes are shuffled).
        self.tokens, self.test_tokens = tokens[: plan.pool], tokens[plan.pool :]
        self.labels, self.test_labels = labels[: plan.pool], labels[plan.pool :]
        self.pooled = np.stack([t.astype(np.float32).reshape(-1, t.shape[-1]).mean(axis=0) for t in self.tokens])
        self.pool_size = plan.pool
        self.plan = plan

    def train(self, labelled: Sequence[int], seed: int, previous: Any, tag: str) -> Any:
        from trainer.classify import HeadParams, train_head

        params = HeadParams(max_epochs=self.plan.max_epochs, seed=seed)
        tokens = [self.tokens[i] for i in labelled]
        return train_head(tokens, [self.labels[i] for i in labelled], CLASSIFIER_CLASSES, params).head

    def metric(self, model: Any) -> float:
        from trainer.classify import classification_metrics, predict_proba

        predicted = predict_proba(model, self.test_tokens).argmax(axis=1).tolist()
        return float(classification_metrics(self.test_labels, predicted, CLASSIFIER_CLASSES)["macro_f1"])

    def scores(self, model: Any, indices: Sequence[int], features: bool) -> tuple[Any, Any]:
        import numpy as np

        from core.uncertainty import margin
        from trainer.classify import predict_proba

        probs = predict_proba(model, [self.tokens[i] for i in indices])
        scores = np.asarray([margin(p) for p in probs])
        return scores, (self.pooled[list(indices)] if features else None)


class _DetectorTask(_Task):
    def __init__(self, plan: LearningPlan, work: Path, stages: dict[str, float]) -> None:
        from core.settings import load_settings
        from labelloop.bench_rig import label_config
        from ls_bridge.controls import plan_for_config
        from trainer.synthetic import CLASSES, write_dataset

        started = time.perf_counter()
        n = plan.pool + plan.held_out
        self.data_yaml = write_dataset(work / "data", n=n, seed=DATA_SEED, val_fraction=plan.held_out / n)
        self.root = self.data_yaml.parent
        self.images = sorted((self.root / "images" / "train").iterdir())
        stages["data_s"] = time.perf_counter() - started
        self.pool_size = len(self.images)
        self.classes = list(CLASSES)
        self.plan = plan
        self.work = work
        self.label_plan = plan_for_config(label_config(self.classes), tuple(self.classes), load_settings().conf)

    def _data(self, labelled: Sequence[int], tag: str) -> Path:
        listing = self.work / "lists" / f"{tag}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{self.images[i]}\n" for i in labelled), encoding="utf-8")
        names = "".join(f"  {i}: {name}\n" for i, name in enumerate(self.classes))
        data = self.work / "lists" / f"{tag}.yaml"
        data.write_text(
            f"path: {json.dumps(str(self.root))}\ntrain: {json.dumps(str(listing))}\nval: images/val\n"
            f"nc: {len(self.classes)}\nnames:\n{names}",
            encoding="utf-8",
        )
        return data

    def train(self, labelled: Sequence[int], seed: int, previous: Any, tag: str) -> Any:
        from trainer.train import train_detector

        data = self._data(labelled, tag)
        first = previous is None
        result = train_detector(
            data,
            self.work / "runs" / tag,
            base=previous,
            epochs=self.plan.first_epochs if first else self.plan.epochs,
            imgsz=self.plan.imgsz,
            batch=8,
            device="cpu",
            seed=seed,
            overrides={"val": False, "workers": 0},
        )
        return result.best

    def metric(self, model: Any) -> float:
        from trainer.evaluate import evaluate

        tag = Path(model).parent.parent.name
        result = evaluate(
            Path(model), self.data_yaml, self.plan.imgsz, split="val", device="cpu", run_dir=self.work / "eval" / tag
        )
        return float(result.map50)

    def scores(self, model: Any, indices: Sequence[int], features: bool) -> tuple[Any, Any]:
        import numpy as np
        from ultralytics import YOLO

        from serving.client import Detection, ImageDetections, ModelInfo

        yolo = YOLO(str(model), task="detect")
        info = ModelInfo("learning", 0, self.classes, [self.plan.imgsz, self.plan.imgsz], "cpu")
        paths = [str(self.images[i]) for i in indices]
        conf = self.label_plan.request_threshold
        scores = []
        for start in range(0, len(paths), 16):
            for result in yolo.predict(
                paths[start : start + 16], imgsz=self.plan.imgsz, conf=conf, device="cpu", verbose=False
            ):
                height, width = result.orig_shape
                boxes = result.boxes
                found = [
                    Detection(self.classes[int(c)], int(c), float(s), *(float(v) for v in xyxy))
                    for c, s, xyxy in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xyxy.tolist(), strict=True)
                ]
                detections = ImageDetections(int(width), int(height), info, found)
                scores.append(self.label_plan.format({"image": detections})[1])
        rows = None
        if features:
            rows = np.stack(
                [
                    e.detach().cpu().numpy().reshape(-1)
                    for start in range(0, len(paths), 16)
                    for e in yolo.embed(paths[start : start + 16], imgsz=self.plan.imgsz, device="cpu", verbose=False)
                ]
            )
        return np.asarray(scores, dtype=np.float64), rows


def _task(plan: LearningPlan, work: Path, stages: dict[str, float]) -> _Task:
    try:
        if plan.kind == "classifier":
            return _ClassifierTask(plan, work, stages)
        return _DetectorTask(plan, work, stages)
    except ImportError as exc:
        raise ConfigError(
            f"bench learning needs the trainer's packages: pip install 'labelloop[train]' ({exc})"
        ) from exc


def _simulate(
    task: _Task, plan: LearningPlan, progress: Callable[[str], None]
) -> tuple[list[int], dict[str, list[list[float]]], dict[str, float]]:
    """Every seed's curve per strategy: label counts, curves[strategy][seed] = metric per count, stage seconds."""
    import numpy as np

    from trainer.selection import select

    counts = [plan.initial + r * plan.batch for r in range(plan.rounds + 1)]
    curves: dict[str, list[list[float]]] = {s: [] for s in plan.strategies}
    spent = {"train_s": 0.0, "evaluate_s": 0.0, "select_s": 0.0}
    clock = time.perf_counter

    for seed in range(plan.seeds):
        rng = np.random.default_rng([seed, 17])
        initial = sorted(rng.permutation(task.pool_size)[: plan.initial].tolist())
        progress(f"seed {seed + 1}/{plan.seeds}: first model on {len(initial)} random labels")
        t0 = clock()
        first = task.train(initial, seed, None, f"s{seed}-initial")
        t1 = clock()
        first_metric = task.metric(first)
        spent["train_s"] += t1 - t0
        spent["evaluate_s"] += clock() - t1
        for strategy in plan.strategies:
            labelled, model, curve = list(initial), first, [first_metric]
            for round_no in range(1, plan.rounds + 1):
                progress(f"seed {seed + 1}/{plan.seeds}, {strategy}: round {round_no}/{plan.rounds}")
                t0 = clock()
                chosen = set(labelled)
                unlabelled = [i for i in range(task.pool_size) if i not in chosen]
                if strategy == "random":
                    scores, features = np.zeros(len(unlabelled)), None
                else:
                    scores, features = task.scores(model, unlabelled, strategy == "diverse")
                picked = select(strategy, scores, plan.batch, features, seed=seed * 1000 + round_no)
                labelled += [unlabelled[int(i)] for i in picked]
                t1 = clock()
                model = task.train(labelled, seed, model, f"s{seed}-{strategy}-r{round_no}")
                t2 = clock()
                curve.append(task.metric(model))
                spent["select_s"] += t1 - t0
                spent["train_s"] += t2 - t1
                spent["evaluate_s"] += clock() - t2
            curves[strategy].append(curve)
    return counts, curves, spent


def summarise(
    counts: Sequence[int], curves: dict[str, list[list[float]]], target: float | None = None
) -> dict[str, Any]:
    """Mean and std per label count, ``labels_to_target`` and ``label_saving`` (module docstring)."""
    import numpy as np

    table: dict[str, list[dict[str, Any]]] = {}
    for strategy, runs in curves.items():
        values = np.asarray(runs, dtype=np.float64)  # (seeds, counts)
        table[strategy] = [
            {
                "labels": int(n),
                "mean": round(float(values[:, k].mean()), 4),
                "std": round(float(values[:, k].std()), 4),
                "values": [round(float(v), 4) for v in values[:, k]],
            }
            for k, n in enumerate(counts)
        ]
    best_final = max((points[-1]["mean"] for points in table.values()), default=0.0)
    rule = "given" if target is not None else f"{TARGET_SHARE} x the best final mean of any strategy"
    goal = float(target) if target is not None else round(TARGET_SHARE * best_final, 4)
    # A target of 0 (nothing learned anywhere) would count every strategy as done at the seed set.
    reached = {
        s: next((p["labels"] for p in points if p["mean"] >= goal), None) if goal > 0 else None
        for s, points in table.items()
    }

    def saving(strategy: str) -> float | None:
        base, got = reached.get("random"), reached.get(strategy)
        if base is None or got is None:
            return None
        return round(1.0 - float(got) / float(base), 4)

    return {
        "label_counts": [int(n) for n in counts],
        "curves": table,
        "target": goal,
        "target_rule": rule,
        "labels_to_target": reached,
        "label_saving": saving("uncertainty"),
        "label_saving_by_strategy": {s: saving(s) for s in table if s != "random"},
    }


def run_learning_bench(plan: LearningPlan, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Render the data, run every seed, round and strategy; the report as a dict (JSON-ready)."""
    say = progress or (lambda line: logger.info("%s", line))
    started = time.perf_counter()
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="labelloop-learning-") as tmp:
        task = _task(plan, Path(tmp), stages)
        if plan.initial + plan.rounds * plan.batch > task.pool_size:
            raise ConfigError(
                f"initial {plan.initial} + rounds {plan.rounds} x batch {plan.batch} "
                f"exceeds the pool ({task.pool_size})"
            )
        counts, curves, spent = _simulate(task, plan, say)
    stages |= spent
    report = {"kind": plan.kind, "metric": METRICS[plan.kind], **summarise(counts, curves, plan.target)}
    other = _DETECTOR_ONLY if plan.kind == "classifier" else _CLASSIFIER_ONLY
    settings = {k: v for k, v in asdict(plan).items() if k not in other}
    report["settings"] = settings | {"strategies": list(plan.strategies), "data_seed": DATA_SEED}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["seconds_by_stage"] = {k: round(v, 1) for k, v in stages.items()}
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    return report


# --- output ------------------------------------------------------------------------------------------


def render_table(report: dict[str, Any]) -> str:
    """The curves as a markdown table (rows: label counts; columns: strategies), then the summary."""
    strategies = list(report["curves"])
    lines = [
        f"bench learning: {report['kind']}, {report['metric']} on the held-out set, mean ± std over "
        f"{report['settings']['seeds']} seed(s)",
        "",
        "| labels | " + " | ".join(strategies) + " |",
        "|---:|" + "---:|" * len(strategies),
    ]
    for k, n in enumerate(report["label_counts"]):
        cells = [f"{report['curves'][s][k]['mean']:.3f} ± {report['curves'][s][k]['std']:.3f}" for s in strategies]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    reached = ", ".join(f"{s} {v if v is not None else 'never'}" for s, v in report["labels_to_target"].items())
    saving = report["label_saving"]
    lines += [
        "",
        f"target {report['metric']} {report['target']:.3f} ({report['target_rule']})",
        f"labels_to_target: {reached}",
        "label_saving (1 - uncertainty / random): " + ("n/a" if saving is None else f"{saving:.1%}"),
    ]
    for strategy, value in report["label_saving_by_strategy"].items():
        if strategy != "uncertainty":
            lines.append(f"{strategy} vs random: " + ("n/a" if value is None else f"{value:.1%}"))
    lines.append(f"run time {report['seconds']:.0f} s ({report['machine']['cpus']} CPUs)")
    return "\n".join(lines) + "\n"


def write_png(report: dict[str, Any], out: Path) -> None:
    """Learning curves, mean ± std band per strategy, target line; needs matplotlib (a dev dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--png needs matplotlib (a dev dependency): pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, points in report["curves"].items():
        xs = [p["labels"] for p in points]
        mean = [p["mean"] for p in points]
        ax.plot(xs, mean, marker="o", label=strategy)
        ax.fill_between(
            xs,
            [m - p["std"] for m, p in zip(mean, points, strict=True)],
            [m + p["std"] for m, p in zip(mean, points, strict=True)],
            alpha=0.2,
        )
    ax.axhline(report["target"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("labelled tasks")
    ax.set_ylabel(f"held-out {report['metric']}")
    saving = report["label_saving"]
    ax.set_title(
        f"{report['kind']}: label saving {'n/a' if saving is None else f'{saving:.0%}'} "
        f"({report['settings']['seeds']} seed(s))"
    )
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plan_from_options(kind: str, quick: bool, **overrides: Any) -> LearningPlan:
    from trainer.selection import STRATEGIES

    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    plan = PLANS[(kind, quick)]
    strategies = overrides.pop("strategies", None)
    if strategies is not None:
        names = tuple(dict.fromkeys(s.strip() for s in strategies.split(",") if s.strip()))
        unknown = [s for s in names if s not in STRATEGIES]
        if unknown or not names:
            raise ConfigError(f"--strategy takes a comma-separated list of {', '.join(STRATEGIES)}; got {strategies!r}")
        plan = replace(plan, strategies=names)
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def learning(
    kind: Annotated[str, typer.Option("--kind", help="classifier or detector.")],
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="Comma-separated: random,uncertainty,diverse (default: all).")
    ] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", min=1, help="Selection rounds after the seed set.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Tasks labelled per round.")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="Repeats with different seed sets.")] = None,
    initial: Annotated[int | None, typer.Option("--initial", min=2, help="Random seed set size.")] = None,
    target: Annotated[
        float | None, typer.Option("--target", help=f"Target metric (default {TARGET_SHARE} x best final mean).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI size: well under 2 minutes per kind on 2 cores.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    png_out: Annotated[Path | None, typer.Option("--png", help="Write the learning curves (PNG) here.")] = None,
    pool: Annotated[int | None, typer.Option(hidden=True, min=2, help="Pool size (tests).")] = None,
    held_out: Annotated[int | None, typer.Option(hidden=True, min=2, help="Held-out size (tests).")] = None,
) -> None:
    """Simulate active learning on synthetic data: learning curves per strategy against a random control."""
    try:
        plan = _plan_from_options(
            kind,
            quick,
            strategies=strategy,
            rounds=rounds,
            batch=batch,
            seeds=seeds,
            initial=initial,
            target=target,
            pool=pool,
            held_out=held_out,
        )
        report = run_learning_bench(plan, progress=lambda line: typer.echo(line, err=True))
        report["settings"]["quick"] = quick
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2) + "\n")
        if png_out is not None:
            write_png(report, png_out)
    except LabelloopError as exc:
        raise fail(exc) from exc
    typer.echo(render_table(report))
