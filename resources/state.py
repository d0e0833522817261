"""The stores the system writes, which backend holds each, and the set-up step that creates
them once, before two processes can race to (`python -m resources.state`; every entry point
runs it: `make demo`, `make ui`, `make advance`, `make serve`, the tests).

One setting picks the backends. Without `EVENTML_POSTGRES_URL` everything is embedded under
`EVENTML_HOME`: Dagster's instance and MLflow on SQLite. With it (a database URL, e.g. the
cluster `make services` starts: postgresql://postgres@127.0.0.1:55432/eventml), Dagster's
instance lives in the database `<name>_dagster` (`dagster-postgres`) and MLflow's tracking and
registry in `<name>_mlflow`; artifacts, tables and Bentos stay where they were. The code that
uses them is the same.

What `prepare` does, under one lock on the state folder, each step a no-op the second time:
the folders; the Postgres databases; `dagster.yaml` (written while it is eventml's own, i.e.
still carries the first line below: delete that line to keep a hand-edited one); Dagster's
storage (created or migrated by opening the instance); MLflow's store and experiment. Stores
opened without it are safe too: MLflow prepares under its own lock (`resources.tracking`),
Delta tables are created if absent before their first write (`resources.delta`), the online
store creates itself under a file lock beside it (`eventml.online_store`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from eventml.home import StateHome, interprocess_lock
from eventml.threads import steps_at_once
from eventml.worlds import load_pack, selected_pack
from resources.tracking import MlflowTracking

POSTGRES_SETTING = "EVENTML_POSTGRES_URL"
GENERATED = "# written by eventml (resources/state.py); delete this line to keep your own edits"


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_SETTING) or None


def database_url(role: str) -> str:
    """The database of `role` ("dagster", "mlflow") on the configured server: `<name>_<role>`."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url())
    url = url.set(database=f"{url.database or 'eventml'}_{role}")
    if role == "dagster":  # its NOTIFY takes client-side parameters: psycopg2, not psycopg 3
        url = url.set(drivername="postgresql+psycopg2")
    return url.render_as_string(hide_password=False)


def dagster_home(home: StateHome) -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or home.dagster)


def mlflow_tracking(home: StateHome) -> MlflowTracking:
    if postgres_url():
        return MlflowTracking.on_postgres(database_url("mlflow"), home.mlflow / "artifacts")
    return MlflowTracking.embedded(home.mlflow)


def dagster_yaml() -> str:
    lines = [GENERATED, "telemetry:", "  enabled: false",
             # the daemon fails runs that never start or outlive dagster/max_runtime
             "run_monitoring:", "  enabled: true",
             # ...and frees the pool slots of runs that ended without freeing them (killed)
             "  free_slots_after_run_end_seconds: 60",
             # the CPU-heavy steps' pool (resources.compute.CPU_POOL), across all runs
             "concurrency:", "  pools:", f"    default_limit: {steps_at_once()}"]  # fmt: skip
    if postgres_url():
        lines += ["storage:", "  postgres:", f"    postgres_url: {database_url('dagster')}"]
    return "\n".join(lines) + "\n"


def create_databases() -> None:
    """The empty databases of the configured server (the provisioning a platform team does)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    server = make_url(postgres_url()).set(database="postgres")
    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as db:
            for role in ("dagster", "mlflow"):
                name = make_url(database_url(role)).database
                exists = db.execute(
                    sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
                ).first()
                if not exists:
                    try:
                        db.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                    except sqlalchemy.exc.ProgrammingError as error:  # another host made it
                        if "already exists" not in str(error):
                            raise
    finally:
        engine.dispose()


def _write_dagster_yaml(folder: Path) -> None:
    path = folder / "dagster.yaml"
    wanted = dagster_yaml()
    if path.exists() and not path.read_text().startswith(GENERATED):
        return  # the user's own
    if not path.exists() or path.read_text() != wanted:
        tmp = path.with_name(f".dagster.yaml.{os.getpid()}")
        tmp.write_text(wanted)
        os.replace(tmp, path)


class HomeHoldsAnotherPack(RuntimeError):
    """The state folder was set up for another dataset pack."""


def claim_for_pack(home: StateHome, pack_name: str) -> None:
    """Record which pack this state folder serves (`<home>/pack`), or refuse another one's: two
    packs' tables, runs and champions in one folder would be read as one source's."""
    marker = home.root / "pack"
    if not marker.exists():
        tmp = marker.with_name(f".pack.{os.getpid()}")
        tmp.write_text(pack_name + "\n")
        os.replace(tmp, marker)
    held = marker.read_text().strip()
    if held != pack_name:
        raise HomeHoldsAnotherPack(
            f"{home.root} holds the state of pack {held!r}, and this deployment runs "
            f"{pack_name!r} (EVENTML_PACK): give each pack its own EVENTML_HOME (`make demo "
            f"WORLD=cards` uses .state-cards). If you renamed your pack, write its new name "
            f"into {marker}; if you changed its contents, run `make migrate`."
        )


def _write_workspace(folder: Path, pack_name: str) -> None:
    """`make ui`'s workspace: the code location is named after the pack it serves."""
    path = folder / "workspace.yaml"
    wanted = (
        f"{GENERATED}\nload_from:\n  - python_module:\n      module_name: ml_assets.definitions\n"
        f"      attribute: defs\n      location_name: {pack_name}\n"
    )
    if not path.exists() or path.read_text() != wanted:
        tmp = path.with_name(f".workspace.yaml.{os.getpid()}")
        tmp.write_text(wanted)
        os.replace(tmp, path)


def fail_killed_runs(instance) -> list[str]:
    """Mark failed the runs still STARTED whose process on this machine is gone (SIGKILLed,
    out of memory), and free the pool slots of every run that has ended: left alone, a killed
    run stays "in progress" forever and the next heavy step waits for its slot. Daemon-launched
    runs also have Dagster's run monitoring (dagster.yaml); a run started by the CLI has no
    daemon to watch it. Returns the run ids it marked."""
    import dagster as dg

    marked = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        run = record.dagster_run
        start = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1
        ).records
        pid = start[0].event_log_entry.dagster_event.pid if start else None
        if pid is None or _alive(pid):
            continue
        instance.report_run_failed(
            run, f"the run's process (pid {pid}) is gone: it was killed before it finished"
        )
        marked.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:  # (an in-memory instance has no pools)
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(home: StateHome | None = None) -> list[str]:
    """Create every store once (see the module docstring); returns where each one is."""
    import dagster as dg

    home = home or StateHome.from_env()
    folder = dagster_home(home)
    with interprocess_lock(home.root / ".prepare.lock"):
        for path in (folder, home.tables, home.landing, home.mlflow, home.logs,
                     home.root / "bentoml" / "models", home.root / "bentoml" / "bentos",
                     home.root / "online", home.root / "predictions"):  # fmt: skip
            path.mkdir(parents=True, exist_ok=True)
        if postgres_url():
            create_databases()
        pack = load_pack(selected_pack())
        claim_for_pack(home, pack.name)
        _write_dagster_yaml(folder)
        _write_workspace(folder, pack.name)
        with dg.DagsterInstance.from_config(str(folder)) as instance:
            killed = fail_killed_runs(instance)  # opening it creates or migrates its storage
        tracking = mlflow_tracking(home)
        tracking.experiment_id()
    storage = database_url("dagster") if postgres_url() else f"SQLite under {folder}"
    return [
        *[f"marked failed: run {run_id}, whose process was killed" for run_id in killed],
        f"state:    {home.root} (pack {pack.name})",
        f"dagster:  {storage}",
        f"mlflow:   {tracking.tracking_uri} (artifacts {tracking.artifact_root})",
    ]


if __name__ == "__main__":
    try:
        print("\n".join(prepare()))
    except Exception as error:  # a set-up step a person reads: one sentence, not a traceback
        sys.exit(f"setting up the state failed: {type(error).__name__}: {error}")
