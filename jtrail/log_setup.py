"""Quiet start-up: the libraries' INFO chatter off, every WARNING (theirs and ours) still shown.

What it silences, as a new user saw it on `jtrail serve`: Orbax's ~16 INFO lines per probe load
(through absl's logger, "... if no error is raised then it is a bug" among them), JAX's "Unable to
initialize backend 'tpu'" on machines without one, and libtpu's / XLA's C++ INFO lines on a TPU VM.
Call it before JAX is imported (the C++ levels are read from the environment when libtpu loads); a
level the user has set in the environment is kept.
"""

from __future__ import annotations

import logging
import os

# C++ logs: 0 INFO, 1 WARNING, 2 ERROR (libtpu's TPU_* levels, TensorFlow-style TF_CPP_MIN_LOG_LEVEL
# for XLA); only their INFO goes
_ENV_LEVELS = {"TPU_STDERR_LOG_LEVEL": "1", "TPU_MIN_LOG_LEVEL": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}
_CHATTY_LOGGERS = ("absl", "jax._src.xla_bridge", "orbax")


def quiet_library_logs() -> None:
    for k, v in _ENV_LEVELS.items():
        os.environ.setdefault(k, v)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
