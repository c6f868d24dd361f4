"""`labelloop up` / `status` / `down` as a newcomer runs them, checked in a real browser.

The stack runs with its defaults: the bridge asks for basic auth, Label Studio's model connection
and webhook carry the generated pair, and the trainer watcher trains when Label Studio says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.events import EventStore
from core.settings import Settings
from tests.conftest import ROOT, TEST_IMGSZ, free_port
from tests.label_studio import LabelStudioAPI

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.label_studio]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
_CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@dataclass
class Stack:
    env: dict[str, str]
    state: Path
    up_output: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "labelloop", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def status(self) -> dict[str, dict[str, object]]:
        result = self.run("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def pids(self) -> dict[str, int]:
        return {
            p.stem: json.loads(p.read_text())["pid"] for p in (self.state / "run").glob("*.json") if p.stem != "stack"
        }

    def credentials(self) -> dict[str, str]:
        return json.loads((self.state / "label_studio" / "credentials.json").read_text())  # type: ignore[no-any-return]

    def bridge_auth(self) -> tuple[str, str]:
        stored = json.loads((self.state / "bridge-auth.json").read_text())
        return stored["user"], stored["password"]

    def studio(self) -> LabelStudioAPI:
        """The tests' Label Studio client, with the admin token `up` stored."""
        return LabelStudioAPI(str(self.status()["label_studio"]["url"]), f"Token {self.credentials()['token']}")


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (ROOT / ".venv-ls" / "bin" / "label-studio").is_file():
        pytest.skip("Label Studio is not installed in .venv-ls (run `make setup`)")
    base = tmp_path_factory.mktemp("stack")
    shutil.copytree(model_repo, base / "model_repository")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABELLOOP_", "LABEL_STUDIO_", "BASIC_AUTH_"))}
    env |= {
        "LABELLOOP_STATE_DIR": str(base / "state"),
        "LABELLOOP_MODEL_REPOSITORY": str(base / "model_repository"),
        "LABELLOOP_GRPC_PORT": str(free_port()),
        "LABELLOOP_HTTP_PORT": str(free_port()),
        "LABELLOOP_METRICS_PORT": str(free_port()),
        "LABELLOOP_BRIDGE_PORT": str(free_port()),
        "LABELLOOP_LABEL_STUDIO_PORT": str(free_port()),
        # A tiny run when Label Studio asks for training; annotations alone never reach the threshold here.
        "LABELLOOP_EPOCHS": "1",
        "LABELLOOP_IMGSZ": str(TEST_IMGSZ),
        "LABELLOOP_BATCH": "8",
        "LABELLOOP_DEVICE": "cpu",
        "LABELLOOP_TRAIN_EVERY_ANNOTATIONS": "1000",
    }
    first = subprocess.run(
        [sys.executable, "-m", "labelloop", "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    handle = Stack(env=env, state=base / "state", up_output=first.stdout)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        yield handle
    finally:
        handle.run("down")


def test_up_starts_everything_on_loopback_and_connects_the_project(stack: Stack) -> None:
    assert "Label Studio  http://127.0.0.1:" in stack.up_output
    assert "login admin@labelloop.local / " in stack.up_output
    state = stack.status()
    assert state["triton"]["ready"] is True and state["triton"]["version"] == 1
    assert state["triton"]["model"] == "defect_detector"
    assert state["bridge"]["status"] == "UP"
    assert str(state["bridge"]["url"]).startswith("http://127.0.0.1:")
    assert isinstance(state["label_studio"]["project_id"], int)
    assert state["label_studio"]["ml_backend_connected"] is True
    assert state["trainer"]["watching"] is True and state["trainer"]["last_run"] is None
    # Every listening socket of every daemon and its children (tritonserver, its stubs) is on loopback;
    # Triton's HTTP endpoint is closed.
    listening = set()
    for pid in stack.pids().values():
        parent = psutil.Process(pid)
        for proc in (parent, *parent.children(recursive=True)):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.add((conn.laddr.ip.removeprefix("::ffff:"), conn.laddr.port))
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert int(stack.env["LABELLOOP_HTTP_PORT"]) not in {port for _, port in listening}
    assert int(stack.env["LABELLOOP_METRICS_PORT"]) in {port for _, port in listening}


def test_the_bridge_asks_for_the_credentials_up_generated(stack: Stack) -> None:
    state = stack.status()
    assert state["bridge"]["auth"] == "basic"
    auth_file = stack.state / "bridge-auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    user, password = stack.bridge_auth()
    url = str(state["bridge"]["url"])
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
        for path in ("/health", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, auth=(user, "wrong")).status_code == 401, path
        assert client.get("/health", auth=(user, password)).json()["status"] == "UP"
    # The password is on no command line and in no log.
    for pid in stack.pids().values():
        parent = psutil.Process(pid)
        for proc in (parent, *parent.children(recursive=True)):
            assert password not in " ".join(proc.cmdline())
    assert all(password not in log.read_text(errors="replace") for log in (stack.state / "logs").glob("*.log"))
    assert password not in stack.up_output
    # Label Studio connects with the pair, and its webhook to the bridge carries it.
    project = state["label_studio"]["project_id"]
    with stack.studio() as api:
        (backend,) = api.ml_backends(project)
        assert backend["auth_method"] == "BASIC_AUTH" and backend["basic_auth_user"] == user
        (hook,) = api.webhooks(project)
        assert hook["url"] == f"{url}/webhook"
        assert hook["headers"]["Authorization"].startswith("Basic ")


def test_second_up_reuses_everything(stack: Stack) -> None:
    before, project = stack.pids(), stack.status()["label_studio"]["project_id"]
    again = stack.run("up")
    assert again.returncode == 0, again.stderr
    assert stack.pids() == before
    assert stack.status()["label_studio"]["project_id"] == project
    assert "training the default detector" not in again.stdout


def test_commands_after_up_find_its_label_studio_without_exports(stack: Stack) -> None:
    """`prelabel` / `train --project` read the Label Studio `up` runs, with the token `up` stored."""
    assert not any(k.startswith("LABEL_STUDIO_") for k in stack.env)
    state = stack.status()
    project, triton = state["label_studio"]["project_id"], str(state["triton"]["url"])
    result = stack.run("prelabel", "--project", str(project), "--triton-url", triton)  # the test's own gRPC port
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"project {project}: 0 predicted"), result.stdout


def test_browser_shows_prelabels_as_regions(stack: Stack, demo_dataset: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); browser check not run")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    state = stack.status()
    url, project = str(state["label_studio"]["url"]), state["label_studio"]["project_id"]
    creds = stack.credentials()
    images = sorted((demo_dataset.parent / "images" / "val").glob("*.jpg"))[:3]
    with stack.studio() as api:
        api.import_files(project, images)
        api.retrieve_predictions(project)
        tasks = api.tasks(project)
    boxes = {t["id"]: len(t["predictions"][0]["result"]) for t in tasks if t["predictions"]}
    assert len(boxes) == len(images) and all(
        t["predictions"][0]["model_version"] == "defect_detector@v1" for t in tasks
    )
    task_id = max(boxes, key=lambda k: boxes[k])
    assert boxes[task_id] > 0, "the test model found nothing to show"

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/user/login/")
            page.fill("input[name=email]", creds["username"])
            page.fill("input[name=password]", creds["password"])
            page.click("button[type=submit]")
            page.wait_for_url(lambda u: "/user/login" not in u, timeout=60_000)
            page.goto(f"{url}/projects/{project}/data?task={task_id}")
            regions = page.locator(".lsf-tree__node_type_rectangleregion")
            regions.nth(boxes[task_id] - 1).wait_for(timeout=60_000)
            # The screenshot is for people: wait until the task image itself has been drawn.
            page.wait_for_function(
                "() => [...document.images].some(i => i.src.includes('/data/upload/') && i.complete)",
                timeout=60_000,
            )
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(ARTIFACTS / "label-studio-prelabels.png"))
            assert regions.count() == boxes[task_id]
            labels = {"dentado", "concave", "perforation"}
            assert all(any(name in text for name in labels) for text in regions.all_inner_texts())
        finally:
            browser.close()


def _login(page: Any, url: str, creds: dict[str, str]) -> None:
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", creds["username"])
    page.fill("input[name=password]", creds["password"])
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/user/login" not in u, timeout=60_000)


def _fill_model_form(page: Any, title: str, bridge_url: str, auth: tuple[str, str]) -> None:
    """Label Studio's Connect / Edit Model dialog, as a person fills it: name, URL, basic auth."""
    page.fill("input[name=title]", title)
    page.fill("input[name=url]", bridge_url)
    # Label Studio 1.23's Edit dialog shows the basic-auth fields of a saved backend but opens its
    # method selector on "No Authentication", and saves what the selector shows: pick it every time.
    method = page.locator("button", has_text="No Authentication")
    if method.count():
        method.first.click()
        page.get_by_text("Basic Authentication").last.click()
    page.locator("input[name=basic_auth_user]").wait_for()
    page.fill("input[name=basic_auth_user]", auth[0])
    page.fill("input[name=basic_auth_pass]", auth[1])
    page.locator("button[type=submit]", has_text="Validate and Save").click()


def test_browser_connects_edits_and_shows_a_classifier_s_choices(stack: Stack, tmp_path: Path) -> None:
    """A classifier session connected and edited in Label Studio's UI; its Choices pre-label seen on a task."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); browser check not run")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from trainer.synthetic_classes import write_classifier_dataset

    data = write_classifier_dataset(tmp_path / "classes", n=40, seed=21)
    labels = json.loads((data / "labels.json").read_text())
    session = tmp_path / "session.yaml"
    classes = ", ".join(f"{{name: {c}}}" for c in labels["classes"])
    session.write_text(
        f"kind: classifier\ntitle: Browser classes\nimages: {data / 'images'}\nclasses: [{classes}]\n"
        "backbone: demo\nlong_side: 224\n"
    )
    created = stack.run("session", "create", str(session), "--no-connect", "--json")
    assert created.returncode == 0, created.stderr
    project = json.loads(created.stdout)["project"]
    state = stack.status()
    url, bridge_url = str(state["label_studio"]["url"]), str(state["bridge"]["url"])
    creds = stack.credentials()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            _login(page, url, creds)
            page.goto(f"{url}/projects/{project}/settings/ml")
            page.locator("button", has_text="Connect Model").first.click()
            _fill_model_form(page, "labelloop", bridge_url, stack.bridge_auth())
            page.get_by_text("Connected").first.wait_for(timeout=60_000)
            page.locator('button[aria-label="Machine learning model options"]').click()
            page.get_by_text("Edit", exact=True).click()
            _fill_model_form(page, "labelloop classifier", bridge_url, stack.bridge_auth())
            page.get_by_text("labelloop classifier").first.wait_for(timeout=60_000)
            with stack.studio() as api:
                (backend,) = api.ml_backends(project)
                assert (backend["title"], backend["readable_state"]) == ("labelloop classifier", "Connected")
                tasks = api.tasks(project)
                truth = {t["id"]: labels["labels"][str(t["data"]["image"]).rsplit("-", 1)[-1]] for t in tasks}
                for task in tasks[:28]:
                    result = [
                        {
                            "from_name": "choice",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [truth[task["id"]]]},
                        }
                    ]
                    api.create_annotation(task["id"], result)
            trained = stack.run("train", "--project", str(project), "--json")
            assert trained.returncode == 0, trained.stderr
            assert json.loads(trained.stdout)["published_version"] == 1
            # Actions -> Retrieve predictions (the Data Manager action), then the task shows the head's class.
            with stack.studio() as api:
                api.retrieve_predictions(project)
            task_id = tasks[-1]["id"]
            page.goto(f"{url}/projects/{project}/data?task={task_id}")
            checked = page.locator(".lsf-choices input[type=checkbox]:checked")
            checked.first.wait_for(state="attached", timeout=60_000)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(ARTIFACTS / "label-studio-choices.png"))
            shown = checked.first.get_attribute("name")
            with stack.studio() as api:
                stored = [p for p in api.predictions(task_id) if p["model_version"] == "browser-classes@v1"]
            assert stored and [stored[-1]["result"][0]["value"]["choices"][0]] == [shown]
            assert shown in labels["classes"]
        finally:
            browser.close()


def test_browser_connects_an_interactive_segmenter_and_shows_its_masks(stack: Stack, tmp_path: Path) -> None:
    """A segmenter session connected (interactive) and edited in Label Studio's UI; its mask seen on a task."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); browser check not run")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import numpy as np
    from PIL import Image

    from trainer.synthetic_blobs import sample_points, write_segmenter_dataset

    data = write_segmenter_dataset(tmp_path / "blobs", n=24, seed=4)
    session = tmp_path / "session.yaml"
    session.write_text(
        f"kind: segmenter\ntitle: Browser blobs\nimages: {data / 'images'}\nclasses: [{{name: defect}}]\n"
        "backbone: demo\nlong_side: 448\n"
    )
    created = stack.run("session", "create", str(session), "--no-connect", "--json")
    assert created.returncode == 0, created.stderr
    project = json.loads(created.stdout)["project"]
    state = stack.status()
    url, bridge_url = str(state["label_studio"]["url"]), str(state["bridge"]["url"])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            _login(page, url, stack.credentials())
            page.goto(f"{url}/projects/{project}/settings/ml")
            page.locator("button", has_text="Connect Model").first.click()
            page.get_by_text("Interactive preannotations").click()
            _fill_model_form(page, "labelloop", bridge_url, stack.bridge_auth())
            page.get_by_text("Connected").first.wait_for(timeout=60_000)
            page.locator('button[aria-label="Machine learning model options"]').click()
            page.get_by_text("Edit", exact=True).click()
            _fill_model_form(page, "labelloop segmenter", bridge_url, stack.bridge_auth())
            page.get_by_text("labelloop segmenter").first.wait_for(timeout=60_000)
            with stack.studio() as api:
                (backend,) = api.ml_backends(project)
                assert (backend["title"], backend["is_interactive"]) == ("labelloop segmenter", True)
                tasks = api.tasks(project)
                for k, task in enumerate(tasks[:18]):
                    name = str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]
                    truth = np.asarray(Image.open(data / "masks" / name))
                    width, height = truth.shape[1], truth.shape[0]
                    result = [
                        {
                            "from_name": "points",
                            "to_name": "image",
                            "type": "keypointlabels",
                            "original_width": width,
                            "original_height": height,
                            "value": {
                                "x": 100 * x / width,
                                "y": 100 * y / height,
                                "width": 0.5,
                                "keypointlabels": ["defect" if c >= 0 else "background"],
                            },
                        }
                        for x, y, c in sample_points(truth, 20, 20, np.random.default_rng(k))
                    ]
                    api.create_annotation(task["id"], result)
            trained = stack.run("train", "--project", str(project), "--json")
            assert trained.returncode == 0, trained.stderr
            assert json.loads(trained.stdout)["published_version"] == 1
            with stack.studio() as api:
                api.retrieve_predictions(project)
            task_id = tasks[-1]["id"]
            page.goto(f"{url}/projects/{project}/data?task={task_id}")
            masks = page.locator(".lsf-tree__node_type_brushregion")
            masks.first.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.images].some(i => i.src.includes('/data/upload/') && i.complete)",
                timeout=60_000,
            )
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(ARTIFACTS / "label-studio-segmenter.png"))
            assert "defect" in masks.first.inner_text()
            # The click-to-mask loop: Auto-Annotation on, the smart point tool, the "background" label, one
            # click on plain metal far from the defect (a click on a shown region would select it instead).
            page.get_by_text("Auto-Annotation").click()
            page.locator("button.lsf-tool_smart").first.click()  # the smart tools Auto-Annotation adds
            page.locator('button[aria-label="key-point-tool"]').last.click()
            page.keyboard.press("2")  # the "background" point label, selected after the tool
            name = str(tasks[-1]["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]
            truth = np.asarray(Image.open(data / "masks" / name))
            ys, xs = np.nonzero(truth)
            grid = [(gx, gy) for gx in np.linspace(0.1, 0.9, 9) for gy in np.linspace(0.15, 0.85, 8)]
            fx, fy = max(
                grid,
                key=lambda p: ((xs / truth.shape[1] - p[0]) ** 2 + (ys / truth.shape[0] - p[1]) ** 2).min(),
            )
            box = page.locator(".konvajs-content").first.bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            # Label Studio sends the click (with the task's other points) to the bridge and shows the refined
            # mask as a suggestion to accept or reject.
            page.get_by_text(re.compile(r"^\d+ suggestions?$")).first.wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(ARTIFACTS / "label-studio-segmenter-click.png"))
            assert "interactive:" in (stack.state / "logs" / "bridge.log").read_text()
        finally:
            browser.close()


def test_start_training_in_label_studio_trains_and_status_shows_the_decision(stack: Stack, demo_dataset: Path) -> None:
    state = stack.status()
    project = state["label_studio"]["project_id"]
    images = sorted((demo_dataset.parent / "images" / "val").glob("*.jpg"))[3:13]
    with stack.studio() as api:
        api.import_files(project, images)
        api.retrieve_predictions(project)
        tasks = api.tasks(project)
        for task in tasks:  # the annotator accepts the pre-labels as they are
            api.create_annotation(task["id"], task["predictions"][0]["result"] if task["predictions"] else [])
        # Label Studio's webhook reached the bridge through basic auth: every annotation is stored.
        store = EventStore.for_settings(Settings(state_dir=stack.state))
        annotated = {e.task_id for e in store.since(0, actions={"ANNOTATION_CREATED"})}
        assert annotated == {t["id"] for t in tasks}
        (backend,) = api.ml_backends(project)
        api.client.post(f"/api/ml/{backend['id']}/train").raise_for_status()
        assert api.client.get(f"/api/ml/{backend['id']}").json()["readable_state"] != "Error"
    assert [e.project_id for e in store.since(0, actions={"START_TRAINING"})] == [project]

    deadline = time.monotonic() + 600
    while (run := stack.status()["trainer"]["last_run"]) is None:
        assert time.monotonic() < deadline, (stack.state / "logs" / "trainer.log").read_text()[-3000:]
        time.sleep(5)
    assert isinstance(run, dict)
    assert run["kind"] == "train" and run["error"] is None, run
    assert run["served_version"] == 1 and isinstance(run["candidate_map50"], float)
    assert isinstance(run["deploy"], bool) and run["reasons"]
    text = stack.run("status")
    assert text.returncode == 0, text.stderr
    last = text.stdout.split("last run", 1)[1]
    assert str(run["run_id"]) in last
    assert ("deployed: published v2" if run["deploy"] else "not deployed: v1 stays served") in last
    assert str(run["reasons"][0]) in last


def test_down_stops_what_up_started_and_only_that(stack: Stack) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pids = stack.pids()
    assert set(pids) == {"triton", "bridge", "label-studio", "trainer"}
    result = stack.run("down")
    assert result.returncode == 0, result.stderr
    try:
        for name, pid in pids.items():
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
        leftovers = [
            p.info["cmdline"]
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and str(stack.state) in " ".join(p.info["cmdline"])
        ]
        assert leftovers == []
        assert bystander.poll() is None
        assert stack.status()["bridge"]["status"] == "DOWN"
    finally:
        bystander.kill()
        bystander.wait()
