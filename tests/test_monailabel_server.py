"""An exported organ bundle served and trained by a real MONAI Label server, over its REST API.

``tests/test_label_loop.py`` emulates ``BundleTrainTask`` in-process; this test starts MONAI Label itself
(``python -m monailabel.main start_server``, what the ``monailabel`` command runs) with a minimal app of its
own whose ``main.py`` registers the bundle through MONAI Label's ``BundleInferTask`` and ``BundleTrainTask``,
as ``sample-apps/monaibundle`` does, with the bundle folder in ``<app>/model/<name>`` and ``--conf models <name>``.
Three synthetic volumes go into the studies folder and their labels into the datastore (``PUT /datastore/label``,
tag ``final``); then ``/infer`` before training, a training round (``POST /train/<name>?run_sync=true``),
``/infer`` again, and a second round that must train from the first round's merged model.

Skipped unless ``monailabel`` is importable (it is not a dependency of the project): ``pip install monailabel``
(docs/slicer.md), or put it beside the venv with ``pip install --target DIR --no-deps monailabel`` and its server's
pure-Python dependencies, and run with ``PYTHONPATH=DIR``. The server runs in its own process group, which the test always
ends; every request has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import export_organ_bundle

pytest.importorskip("monailabel")

TINY = dict(epochs=1, val_interval=1, synthetic_volumes=4, volumes_per_batch=2, slices_per_volume=4, image_size=64, select_batches=2)
NAME = "medseg_organ"  # the bundle's folder in <app>/model and its model name in MONAI Label
START_TIMEOUT, INFER_TIMEOUT, TRAIN_TIMEOUT = 180, 300, 600

APP_MAIN = '''
import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask


class BundleApp(MONAILabelApp):
    """The local bundles named by ``--conf models a,b``, each in <app>/model/<name>."""

    def __init__(self, app_dir, studies, conf):
        names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()]
        self.bundles = {n: os.path.join(app_dir, "model", n) for n in names}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medseg-peft test app", description="exported bundles")

    def init_infers(self):
        return {n: BundleInferTask(path, self.conf) for n, path in self.bundles.items()}

    def init_trainers(self):
        tasks = {n: BundleTrainTask(path, self.conf) for n, path in self.bundles.items()}
        return {n: t for n, t in tasks.items() if t.is_valid()}
'''

# no sessions folder in $HOME, no file watcher, no scoring after a round, no mlflow
SERVER_ENV = {"MONAI_LABEL_SESSIONS": "false", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
              "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_TASKS_SCORING": "false"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, path in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Server:
    """A MONAI Label server in its own process group, and requests to it that fail with its log's tail."""

    def __init__(self, app: Path, studies: Path, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", NAME, "--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, **SERVER_ENV, "MONAI_LABEL_SESSION_PATH": str(app / "sessions")}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def tail(self, n: int = 60) -> str:
        """The server log's last traceback (MONAI Label logs a failed request's there), else its last ``n`` lines."""
        lines = self.log.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        return "\n".join(lines[starts[-1]:starts[-1] + 120] if starts else lines[-n:])

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the MONAI Label server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return json.loads(self.request("GET", "/info/", timeout=5))
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        pytest.fail(f"the MONAI Label server did not answer in {timeout} s:\n{self.tail()}")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None, timeout: float = 60) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.read()

    def call(self, method: str, path: str, timeout: float, **kwargs) -> bytes:
        try:
            return self.request(method, path, timeout=timeout, **kwargs)
        except urllib.error.HTTPError as err:
            time.sleep(1)  # the server logs a failed request's traceback as it answers: let it reach the file
            pytest.fail(f"{method} {path}: HTTP {err.code} {err.read()[:2000]!r}\nserver log:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the server left in its group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=15)


def put_label(server: Server, image_id: str, label: Path) -> dict:
    body, ctype = multipart({"params": "{}"}, {"label": label})
    return json.loads(server.call("PUT", f"/datastore/label?image={image_id}&tag=final", INFER_TIMEOUT, body=body, content_type=ctype))


def infer(server: Server, image_id: str, out: Path) -> np.ndarray:
    body, ctype = multipart({"params": json.dumps({"device": "cpu"})}, {})
    out.write_bytes(server.call("POST", f"/infer/{NAME}?image={image_id}&output=image", INFER_TIMEOUT, body=body, content_type=ctype))
    return np.asanyarray(nib.load(out).dataobj)


def train(server: Server, **params) -> dict:
    body = json.dumps({"device": "cpu", "multi_gpu": False, **params}).encode()
    return json.loads(server.call("POST", f"/train/{NAME}?run_sync=true", TRAIN_TIMEOUT, body=body, content_type="application/json"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny exported organ bundle in a MONAI Label app, three synthetic volumes in the studies folder, the server up."""
    root = tmp_path_factory.mktemp("monailabel")
    exported, cache = export_organ_bundle(root, **TINY)
    app, studies = root / "app", root / "studies"
    (app / "model").mkdir(parents=True)
    (app / "main.py").write_text(APP_MAIN)
    bundle = Path(shutil.copytree(exported, app / "model" / NAME))
    images = sorted(cache.glob("*/imagesTr/*.nii.gz"))[:3]
    studies.mkdir()
    for image in images:
        shutil.copy(image, studies / image.name)
    labels = {p.name.removesuffix(".nii.gz"): p.parent.parent / "labelsTr" / p.name for p in images}
    server = Server(app, studies, root / "server.log")
    try:
        info = server.wait_ready()
        yield server, info, bundle, labels
    finally:
        server.stop()


def test_the_server_labels_trains_two_rounds_and_serves_each_result(served, tmp_path):
    server, info, bundle, labels = served
    assert NAME in info["models"] and NAME in info["trainers"]
    panel = info["trainers"][NAME]["config"]
    assert panel["method"][0] == "fps" and {"k", "lr"} <= set(panel)  # the bundle's displayable_configs in the train panel

    for image_id, label in labels.items():
        assert put_label(server, image_id, label)["label"] == image_id
    assert json.loads(server.call("GET", "/info/", 30))["datastore"]["completed"] == len(labels)

    first, second = list(labels)[:2]
    truth = np.asanyarray(nib.load(labels[first]).dataobj)
    zero_shot = infer(server, first, tmp_path / "zero_shot.nii.gz")
    assert zero_shot.shape == truth.shape and set(np.unique(zero_shot)) <= {0, 1, 2, 3}
    # the next volume at once: MONAI Label reuses the parsed transforms and unloads the bundle's scripts.* in between
    assert infer(server, second, tmp_path / "zero_shot_next.nii.gz").shape == nib.load(labels[second]).shape

    # round 1: every volume trains (val_split 0), so the round keeps its last epoch and the model changes
    train(server, max_epochs=2, val_split=0.0, method="fps", k=8, lr=1e-2)
    one = json.loads((bundle / "rounds" / "round_1" / "round.json").read_text())
    assert one["round"] == 1 and one["method"] == "fps" and not one["validated"]
    after_one = infer(server, first, tmp_path / "round_1.nii.gz")
    assert after_one.shape == truth.shape and (after_one != zero_shot).any(), "/infer did not use the model of round 1"

    # round 2: another method from the panel, one volume for validation; it trains from round 1's merged model
    train(server, max_epochs=1, val_split=0.34, method="lora", k=4, lr=2e-3)
    two = json.loads((bundle / "rounds" / "round_2" / "round.json").read_text())
    assert two["round"] == 2 and two["method"] == "lora" and two["validated"]
    base_one = json.loads((bundle / "rounds" / "round_1" / "run.json").read_text())["base_model"]
    base_two = json.loads((bundle / "rounds" / "round_2" / "run.json").read_text())["base_model"]
    assert base_two != base_one
    infer(server, first, tmp_path / "round_2.nii.gz")

    log = server.log.read_text(errors="replace")
    assert "Checkpoint keys don't match" not in log  # /infer loaded models/model.pt whole (MONAI Label loads it non-strict)
    assert not (bundle / "rounds" / ".lock").exists()
