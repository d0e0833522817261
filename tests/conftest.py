"""Every test runs against its own state folder: nothing touches the developer's .state/."""

import os
import tempfile


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="eventml-test-")
    os.environ["EVENTML_HOME"] = home
    os.environ["DAGSTER_HOME"] = os.path.join(home, "dagster")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
