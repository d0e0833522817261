"""Every test runs against its own state folder: nothing touches the developer's .state/.

Postgres and Redis (the production counterparts of the embedded SQLite stores) are the throwaway
servers that `make test` and `.ci/run` start (scripts/services.sh) at EVENTML_TEST_POSTGRES_URL
and EVENTML_TEST_REDIS_URL. Where none answers, their tests skip and say so; under CI they fail
instead, because CI must run them.

Runs executed in the test process use `dg.DagsterInstance.ephemeral()` (run and event storage in
memory). Dagster's SQLite and Postgres event logs spend ~10 ms of CPU on every event, and a run
over a year of daily partitions writes ~1,500 (a materialization per partition and asset): a
third of such a run's time, which the suite paid in every fixture that ingests a world. Tests of
the deployed instance itself (`make demo`, the UI, the kill tests) keep a real DAGSTER_HOME.
"""

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="eventml-test-")
    os.environ["EVENTML_HOME"] = home
    os.environ["DAGSTER_HOME"] = os.path.join(home, "dagster")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    os.environ.pop("EVENTML_POSTGRES_URL", None)  # the embedded default unless a test asks
    os.environ.pop("EVENTML_REDIS_URL", None)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a running Postgres server (database `postgres`)."""
    import sqlalchemy

    url = _service_url("EVENTML_TEST_POSTGRES_URL", "url")
    try:
        server = sqlalchemy.engine.make_url(url).set(database="postgres")
        engine = sqlalchemy.create_engine(server)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:
        _unavailable("Postgres", f"no Postgres at {url or '(no URL)'} ({type(error).__name__})")
    return server.render_as_string(hide_password=False)


def _service_url(setting: str, command: str) -> str:
    """The server's URL as `make test` passes it in `setting`, else as scripts/services.sh
    names it."""
    script = str(REPO / "scripts" / "services.sh")
    return os.environ.get(setting) or (
        subprocess.run([script, command], capture_output=True, text=True).stdout.strip()
    )


def _unavailable(service: str, why: str) -> None:
    """Skip a test whose server is not running; under CI, fail it: CI must run them all."""
    why = f"{why}; `make services` starts one"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run the {service} tests: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The URL of a running Redis server (EVENTML_TEST_REDIS_URL, as `make test` sets it)."""
    import redis

    url = _service_url("EVENTML_TEST_REDIS_URL", "redis-url")
    try:
        redis.Redis.from_url(url).ping()
    except Exception as error:
        _unavailable("Redis", f"no Redis at {url or '(no URL)'} ({type(error).__name__})")
    return url


@pytest.fixture
def redis_url(redis_server):
    """An online-store URL of a test's own: a key prefix no other test uses, its keys deleted
    afterwards."""
    import redis

    prefix = f"eventml-test-{uuid.uuid4().hex[:10]}"
    yield f"{redis_server}?prefix={prefix}"
    client = redis.Redis.from_url(redis_server)
    if keys := list(client.scan_iter(f"{prefix}:*", count=1000)):
        client.delete(*keys)


@pytest.fixture(scope="session")
def new_postgres_url(postgres_server):
    """Values for EVENTML_POSTGRES_URL whose databases (`<name>_dagster`, `<name>_mlflow`) do
    not exist yet: each call, an empty home on Postgres. Dropped when the session ends."""
    import sqlalchemy

    server = sqlalchemy.engine.make_url(postgres_server)
    names = []

    def new() -> str:
        names.append(f"eventml_test_{uuid.uuid4().hex[:10]}")
        return server.set(database=names[-1]).render_as_string(hide_password=False)

    yield new
    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as db:
        for name in names:
            for role in ("dagster", "mlflow"):
                db.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}_{role}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def postgres_url(new_postgres_url) -> str:
    return new_postgres_url()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of two CPUs, started once per session (per pytest worker): the
    `compute` resource's Ray backend finds it started and uses it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# Test files that share a session-scoped fixture: one unit of work, so one worker builds it once.
SHARED_FIXTURE = {
    "tests/ml_assets/test_features_assets.py": "small_world_trained",
    "tests/ml_assets/test_training_half.py": "small_world_trained",
    # One local Ray cluster of two CPUs, not one per worker side by side on the same two cores.
    "tests/ml_assets/test_features_on_ray.py": "ray_cluster",
    "tests/eventml/test_cluster.py": "ray_cluster",
}


# The files that take longest (worker-seconds, docs/figures.md), longest first: they run before
# every other file, so the two workers finish together (the longest-first rule of scheduling).
LONGEST_FIRST = (
    "tests/e2e/test_demo.py", "tests/e2e/test_closed_loop.py", "tests/e2e/test_cards_world.py",
    "tests/e2e/test_bento.py", "tests/ml_assets/test_features_assets.py",
    "tests/ml_assets/test_training_half.py", "tests/e2e/test_own_pack.py",
    "tests/resources/test_shared_state.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s workers take whole files (a worker builds a file's module fixtures once),
    in collection order (`--no-loadscope-reorder`; `LONGEST_FIRST` leads it), and the files of
    `SHARED_FIXTURE` together."""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSharedFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_FIXTURE.get(path, path)

    return FilesAndSharedFixtures(config, log)
