"""Issue 18 item 5: start-up without the libraries' INFO chatter (Orbax via absl, JAX backend probing),
while warnings, theirs and ours, and our own INFO lines still show."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from jtrail.log_setup import quiet_library_logs
if QUIET:
    quiet_library_logs()
import jax
jax.devices()  # backend probing
from jtrail.models.probe_io import load_probe
from jtrail.shipped import resolve_probe_path
load_probe(resolve_probe_path(None))  # the shipped probe: an Orbax restore
logging.getLogger("absl").warning("an absl warning")
logging.getLogger("jtrail.serve").warning("a warning of ours")
logging.getLogger("jtrail.serve").info("an info line of ours")
"""


def _stderr(quiet: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_STDERR_LOG_LEVEL", "TPU_MIN_LOG_LEVEL",
                                                            "TF_CPP_MIN_LOG_LEVEL")}
    r = subprocess.run([sys.executable, "-c", f"QUIET = {quiet}\n{SCRIPT}"], capture_output=True, text=True,
                       env={**env, "JAX_PLATFORMS": ""}, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_orbax_and_jax_info_lines_are_gone_warnings_stay() -> None:
    loud = _stderr(quiet=False)
    assert "absl INFO" in loud  # the noise this removes is real (else the test below proves nothing)
    quiet = _stderr(quiet=True)
    assert "absl INFO" not in quiet and "xla_bridge INFO" not in quiet, quiet
    for line in ("absl WARNING an absl warning", "jtrail.serve WARNING a warning of ours",
                 "jtrail.serve INFO an info line of ours"):
        assert line in quiet, quiet
