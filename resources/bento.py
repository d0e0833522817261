"""The `serving` resource: where serving state lives (the BentoML model and Bento store, the
online store, the prediction log, all under `$EVENTML_HOME`), publishing a champion into the
BentoML store, and serving a built Bento in a subprocess.

Publishing (save the model, build the Bento) runs in a child Python process with its own
`BENTOML_HOME`: bentoml reads its home when first imported and caches its stores, and a build
imports the service module and keeps its Bento arguments process-wide, so a child keeps the
Dagster process (and the tests) independent of all three.

    python -m resources.bento publish MODEL_DIR SPEC_JSON MLFLOW_VERSION   # prints JSON tags
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dagster as dg
import yaml

from eventml.features.kernels import COMPILE_LOCK
from eventml.home import StateHome, interprocess_lock
from eventml.online_store import OnlineStore, open_store
from eventml.pack import DatasetPack
from eventml.schema import DatasetSpec
from eventml.score_api import MODEL_NAME, SPEC_FILE

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "eventml.service:RiskService"
SERVICE_NAME = "eventml_risk"
# What the Bento's code imports (bentoml itself is added by the build).
RUNTIME_PACKAGES = (
    "numpy", "numba", "polars", "pydantic", "pyyaml", "threadpoolctl", "xgboost", "torch",
    "redis", "hiredis",
)  # fmt: skip


def pinned_packages() -> list[str]:
    """`name==version` of the installed runtime packages. torch reports `2.13.0+cpu`: the local
    suffix is dropped, which is right for PyPI (a CPU image adds the PyTorch CPU index)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving(dg.ConfigurableResource):
    home: str  # BENTOML_HOME: models/ and bentos/ live under it
    online_store: str  # where the service reads histories: a SQLite file, or a redis:// URL
    prediction_log: str  # the folder of the service's prediction log (JSON lines)

    @classmethod
    def under(cls, root: Path, online_store: str | None = None) -> Serving:
        """Everything under `root`; the online store there too, unless `online_store` names
        another (a redis:// URL)."""
        return cls(
            home=str(root / "bentoml"),
            online_store=online_store or str(root / "online" / "store.sqlite"),
            prediction_log=str(root / "predictions"),
        )

    @classmethod
    def configured(cls, home: StateHome) -> Serving:
        """The deployment's: under the state folder, the online store where `home` says
        (on Redis where EVENTML_REDIS_URL is set)."""
        return cls.under(home.root, online_store=home.online_store)

    def store(self, spec: DatasetSpec) -> OnlineStore:
        return open_store(self.online_store, spec)

    def env(self, **extra: str) -> dict[str, str]:
        # Usage analytics are on by default in bentoml; off here.
        return {**os.environ, "BENTOML_HOME": self.home, "BENTOML_DO_NOT_TRACK": "True", **extra}

    def bentos(self) -> list[dict]:
        """Built Bentos of the service, newest first: tag, labels, model tag, creation time."""
        found = []
        for info in Path(self.home, "bentos", SERVICE_NAME).glob("*/bento.yaml"):
            meta = yaml.safe_load(info.read_text())
            found.append(
                {
                    "tag": f"{SERVICE_NAME}:{meta['version']}",
                    "labels": meta.get("labels", {}),
                    "model_tag": (meta.get("args") or {}).get("model"),
                    "created": str(meta.get("creation_time")),
                }
            )
        return sorted(found, key=lambda b: b["created"], reverse=True)

    def bento_for(self, mlflow_version: str) -> dict | None:
        return next(
            (b for b in self.bentos() if b["labels"].get("mlflow_version") == str(mlflow_version)),
            None,
        )

    def served_pack(self, bento: dict) -> DatasetPack:
        """The dataset pack a built Bento's model was trained on (saved beside it): what its
        request models are made from, whatever the deployment's pack has become since."""
        if not bento.get("model_tag"):
            raise ValueError(
                f"Bento {bento['tag']} names no model: rebuild it (risk_service_bento)"
            )
        name, version = bento["model_tag"].split(":")
        return DatasetPack.model_validate_json(
            Path(self.home, "models", name, version, SPEC_FILE).read_text()
        )

    def publish(self, model_dir: Path, spec_json: str, mlflow_version: str) -> dict:
        """Save the RiskModel bundle into the model store and build the Bento pinned to it."""
        Path(self.home).mkdir(parents=True, exist_ok=True)
        # A spec file of this publish's own: two runs may publish at once.
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=self.home) as spec_file:
            spec_file.write(spec_json)
            spec_file.flush()
            out = subprocess.run(
                [sys.executable, "-m", "resources.bento", "publish", str(model_dir),
                 spec_file.name, str(mlflow_version)],
                cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"publishing the Bento failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    @contextmanager
    def serve(
        self,
        bento_tag: str,
        online_store: str | None = None,
        prediction_log: str | None = None,
        port: int | None = None,
        workers: int = 1,
        max_in_flight: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 180.0,
    ) -> Iterator[str]:
        """`bentoml serve` of a built Bento in its own process group; yields the base URL once
        /readyz answers 200 and stops the whole tree on exit."""
        import httpx

        port = port or free_port()
        env = self.env(
            EVENTML_ONLINE_STORE=str(online_store or self.online_store),
            EVENTML_PREDICTION_LOG=str(prediction_log or self.prediction_log),
            # `--api-workers` is ignored for @bentoml.service classes; the config override is not.
            BENTOML_CONFIG_OPTIONS=f"services.{SERVICE_NAME}.workers={workers}",
            **({"EVENTML_MAX_IN_FLIGHT": str(max_in_flight)} if max_in_flight else {}),
        )
        # The server's output is always kept: when it fails to start, its own error is the answer.
        log_path = log_path or Path(self.home) / "serve-logs" / f"{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)],
            cwd=Path(self.home), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _ARBITERS[url] = proc.pid
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"bentoml serve {bento_tag} exited with {proc.returncode}: "
                        f"{server_error(log_path)} (log: {log_path})"
                    )
                if (failed := log_path.read_text(errors="replace").count(TRACEBACK)) >= 3:
                    raise RuntimeError(
                        f"bentoml serve {bento_tag}: its workers keep failing to start ({failed} "
                        f"tracebacks): {server_error(log_path)} (log: {log_path})"
                    )
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"bentoml serve {bento_tag} not ready after {ready_timeout} s: "
                        f"{server_error(log_path)} (log: {log_path})"
                    )
                time.sleep(0.2)
            yield url
        finally:
            _ARBITERS.pop(url, None)
            _stop(proc)
            log.close()


TRACEBACK = "Traceback (most recent call last)"


def server_error(log_path: Path, lines: int = 12) -> str:
    """The end of the server's last traceback (where its own error is), else its last lines."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    if TRACEBACK not in text:
        return "\n".join(text.strip().splitlines()[-lines:]) or "(the server wrote nothing)"
    block = []
    for line in text[text.rfind(TRACEBACK) :].splitlines()[1:]:
        block.append(line)
        if line and not line[0].isspace():  # the exception's own line ends the traceback
            break
    return "\n".join(block[-lines:])


_ARBITERS: dict[str, int] = {}  # url -> pid of the `bentoml serve` serving it


def worker_pids(url: str) -> list[int]:
    """The pids of the service workers behind `url` (served by `Serving.serve`): what an
    operator's kill, or the kernel's OOM killer, would hit."""
    return sorted(_children(_ARBITERS[url]))


def _children(pid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the arbiter's group (workers run on_shutdown); circus workers have their own
    sessions, so a killed arbiter's workers are found by parent pid and killed too."""
    if proc.poll() is not None:
        return
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the child process


def _publish(model_dir: str, spec_path: str, mlflow_version: str) -> dict:
    import bentoml

    # The bundle goes into the store as MLflow holds it (UBJ, state_dict + JSON; no pickle),
    # without importing torch and xgboost here: the parity check that follows serves the Bento,
    # which loads every part of it.
    scorer = json.loads(Path(model_dir, "scorer", "scorer.json").read_text())
    with bentoml.models.create(
        MODEL_NAME,
        labels={"mlflow_model": MODEL_NAME, "mlflow_version": str(mlflow_version)},
        metadata={
            "format": "eventml-risk-model",
            "tasks": scorer["tasks"],
            "features": len(scorer["feature_names"]),
        },
    ) as stored:
        shutil.copytree(model_dir, stored.path, dirs_exist_ok=True)
        Path(stored.path_of(SPEC_FILE)).write_text(Path(spec_path).read_text())
    # The build walks its whole context (a checkout's .venv and state too): a context of the
    # package's own sources alone takes a fraction of a second.
    with tempfile.TemporaryDirectory() as context:
        shutil.copytree(ROOT / "eventml", Path(context, "eventml"),
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        bento = bentoml.bentos.build(
            SERVICE,
            build_ctx=context,
            include=["eventml/**/*.py"],
            labels={"mlflow_model": MODEL_NAME, "mlflow_version": str(mlflow_version)},
            # Locking needs the network. The exact model tag: the Bento serves this model and no
            # later one.
            python={"packages": pinned_packages(), "lock_packages": False},
            args={"model": str(stored.tag)},
        )
    _copy_compiled_kernels(Path(bento.path_of("src")))
    return {"model_tag": str(stored.tag), "bento_tag": str(bento.tag)}


def _copy_compiled_kernels(src: Path) -> None:
    """numba's cache of the feature kernels this machine compiled, beside the built Bento's copy
    of their source: its first start would otherwise spend ~10 s compiling them. numba keys each
    entry by the source's hash and the CPU, so an entry that does not fit is recompiled, never
    used. (BentoML builds and exports leave `__pycache__` out, so it is copied in afterwards; an
    exported Bento compiles on its first start.)"""
    with interprocess_lock(COMPILE_LOCK):  # no process is writing the cache meanwhile
        for cached in ROOT.glob("eventml/**/__pycache__/*.nb[ci]"):
            target = src / cached.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, target)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "publish":
        sys.exit("usage: python -m resources.bento publish MODEL_DIR SPEC_JSON MLFLOW_VERSION")
    print(json.dumps(_publish(*sys.argv[2:])))
