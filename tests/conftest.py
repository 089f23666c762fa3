"""Hypothesis profiles: `ci` (few, derandomized examples) when $CI is set, `dev` otherwise.

Pick another with `pytest --hypothesis-profile=NAME`. Tests import `helpers` and `strategies`
directly: pytest puts this folder on sys.path (rootdir-relative, no `tests/__init__.py`).
"""

import os

# compile in this process: a pool of compile workers is one more thing that can hang a run
# (one local run stalled with two finished children unreaped; the cause was not found)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
