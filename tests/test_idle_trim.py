"""gc-preload.js on SIGUSR2 (the idle ladder's GC rung), against real node: a full GC, then
malloc_trim(0) through malloc-trim.node, one JSON report line on stderr, and the process lives on.

Fast (no Theia, no browser): a node program fills the C heap with small buffers and lets them go,
as an idle Theia backend has done by the time it is laddered; the trim hands those pages back.
Needs node and the addon built by images/theia/build (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest


THEIA = Path(__file__).resolve().parents[1] / "images" / "theia"
NODE = shutil.which("node")
ADDON = THEIA / "malloc-trim.node"
MIB = 2**20

# Fill ~60 MiB of C heap with 1 KB buffers (Buffer.allocUnsafeSlow: malloc'd backing stores), keep a
# few so the freed ones are holes rather than the top of the heap, let the rest go, then say so.
PROGRAM = """
let kept = [], dropped = [];
for (let i = 0; i < 60000; i++) (i % 64 ? dropped : kept).push(Buffer.allocUnsafeSlow(1000).fill(1));
dropped = null;
global.gc(); global.gc();
process.stdout.write('ready\\n');
setInterval(() => {}, 1000);
"""

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(not ADDON.is_file(), reason=f"{ADDON} not built: run images/theia/build"),
]


class Node:
    def __init__(self, preload_dir: Path) -> None:
        assert NODE is not None
        self.proc = subprocess.Popen([NODE, "--expose-gc", "--require", str(preload_dir / "gc-preload.js"), "-e", PROGRAM],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def report(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGUSR2)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith('{"wsup":"gc"'), line
        return dict(json.loads(line))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node(THEIA)
    try:
        yield n
    finally:
        n.stop()


def test_sigusr2_collects_and_trims_and_the_process_lives_on(node: Node) -> None:
    first = node.report()
    print(f"\nGC {first['ms']} ms, malloc_trim {first['trim_ms']} ms: RSS {first['rss_before'] / MIB:.1f} -> "
          f"{first['rss_after_gc'] / MIB:.1f} after the GC -> {first['rss_after'] / MIB:.1f} MiB after the trim")
    assert first["ok"] is True and first["trimmed"] is True, first
    assert first["rss_after"] < first["rss_after_gc"] - 20 * MIB, first  # the freed C heap went back
    assert node.proc.poll() is None
    again = node.report()  # nothing left to return: still a valid report, and still alive
    assert again["ok"] is True and again["rss_after"] <= first["rss_after"] + 4 * MIB, again
    assert node.proc.poll() is None


def test_without_the_addon_the_gc_still_runs_and_says_why_there_was_no_trim() -> None:
    with tempfile.TemporaryDirectory(prefix="wsup-trim-") as tmp:
        shutil.copy(THEIA / "gc-preload.js", tmp)  # no malloc-trim.node beside it
        n = Node(Path(tmp))
        try:
            report = n.report()
            assert report["ok"] is True and report["trimmed"] is False, report
            assert "malloc-trim.node" in report["trim_error"], report
            assert n.proc.poll() is None
        finally:
            n.stop()
