"""Atomic outputs: a writer killed with SIGKILL leaves a hidden partial directory; the next writer removes it."""

import os
import signal
import subprocess
import sys

import pytest

from turboquant.errors import OutputError
from turboquant.fsutil import atomic_output_dir, remove_stale_partials


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{live}", ".other.tmp-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.bin").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    removed = remove_stale_partials(tmp_path, "out")
    assert sorted(p.name for p in removed) == sorted([f".out.old-{dead}", f".out.tmp-{dead}"])
    assert (tmp_path / f".out.tmp-{live}").is_dir() and (tmp_path / ".other.tmp-1").is_dir()


def test_a_writer_killed_between_its_renames_gets_its_old_output_back(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "model.bin").write_bytes(b"complete")
    remove_stale_partials(tmp_path, "out")
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"complete"


def test_sigkilled_writer_leaves_nothing_after_the_next_run(tmp_path):
    """A real SIGKILL in the middle of writing, then a normal run of the same output."""
    code = ("import time; from pathlib import Path; from turboquant.fsutil import atomic_output_dir\n"
            f"with atomic_output_dir(Path({str(tmp_path / 'out')!r})) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.iterdir()] == [f".out.tmp-{proc.pid}"]  # what a crash leaves
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "model.bin").write_bytes(b"ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass

