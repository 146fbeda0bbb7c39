"""System tools some tests drive for real (Chromium, PgBouncer, Slurm), found or installed.

`require(binary, package)` returns the tool's path. When it is missing and this is a Debian
machine where the tests run as root (as on CI and a fresh developer box here), the Debian
package is installed with apt-get first, so `python -m pytest` works as the README says;
otherwise the test fails, naming the command that installs it. A missing tool never skips.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.cache
def _apt_updated() -> bool:
    done = subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
    return done.returncode == 0


def require(binary: str, *packages: str) -> str:
    """The path of `binary`, installing Debian `packages` when it is missing."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    install = f"apt-get install -y {' '.join(packages)}"
    if os.geteuid() == 0 and shutil.which("apt-get") and _apt_updated():
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", *packages],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if done.returncode == 0 and found:
            return found
        pytest.fail(f"`{install}` failed: {done.stderr.strip()[-300:]}", pytrace=False)
    pytest.fail(f"{binary} is not installed; run `{install}` (as root)", pytrace=False)
