"""The Dagster code location. Each of its processes (the code server, a run, each step forked from
it) sizes its thread pools to the step budget first, before a library starts one."""

from eventml.threads import use_step_threads

use_step_threads()
