"""Every test runs against its own state folder: nothing touches the developer's .state/.

Postgres (the production counterpart of the embedded SQLite stores) is the throwaway cluster
that `make test` and `.ci/run` start (scripts/services.sh) at EVENTML_TEST_POSTGRES_URL. Where
none answers, its tests skip and say so; under CI they fail instead, because CI must run them.
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


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a running Postgres server (database `postgres`)."""
    import sqlalchemy

    url = (
        os.environ.get("EVENTML_TEST_POSTGRES_URL")
        or subprocess.run(
            [str(REPO / "scripts" / "services.sh"), "url"], capture_output=True, text=True
        ).stdout.strip()
    )
    try:
        server = sqlalchemy.engine.make_url(url).set(database="postgres")
        engine = sqlalchemy.create_engine(server)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:
        why = f"no Postgres at {url or '(no URL)'} ({type(error).__name__}); `make services` starts one"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI must run the Postgres tests: {why}")
        pytest.skip(why)
    return server.render_as_string(hide_password=False)


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
