"""docs/protocol.md's C example builds a labels-only message that xentd's own decoder reads as one."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from xentd import validate, wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# A main for the example's builder: the three frames on stdout, each after its length (8 bytes, little-endian).
MAIN = r"""
#include <string.h>
int main(void) {
    int64_t targets[4] = {1, 0, 2, -1};
    uint64_t ids[4] = {18446744073709551615u, 42, 9223372036854775808u, 0};
    char header[512];
    unsigned char t[4 * 8], d[4 * 8];
    int len = build_labels("fraud-v3", 4, targets, ids, header, sizeof header, t, d);
    if (len < 0) return 1;
    if (build_labels("fraud-v3", 4, targets, ids, header, 16, t, d) != -1) return 2;  /* too small: refused */
    len = build_labels("fraud-v3", 4, targets, ids, header, sizeof header, t, d);
    unsigned char n[8];
    put_u64le(n, (uint64_t)len); fwrite(n, 1, 8, stdout); fwrite(header, 1, (size_t)len, stdout);
    put_u64le(n, sizeof t); fwrite(n, 1, 8, stdout); fwrite(t, 1, sizeof t, stdout);
    put_u64le(n, sizeof d); fwrite(n, 1, 8, stdout); fwrite(d, 1, sizeof d, stdout);
    return 0;
}
"""


def _builder_source() -> str:
    section = DOC.read_text().split("### A labels-only message in C", 1)[1]
    blocks = re.findall(r"```c\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 2 and "zmq" not in blocks[0] and "zmq_send" in blocks[1]
    return blocks[0]


def _frames(out: bytes) -> list[bytes]:
    frames = []
    while out:
        (length,) = struct.unpack_from("<Q", out)
        frames.append(out[8 : 8 + length])
        out = out[8 + length :]
    return frames


needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def _built_by_the_example(tmp_path: Path) -> list[bytes]:
    source = tmp_path / "labels.c"
    source.write_text(_builder_source() + MAIN)
    binary = tmp_path / "labels"
    cc = subprocess.run(
        ["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(binary)], capture_output=True, timeout=30)
    assert run.returncode == 0, run
    frames = _frames(run.stdout)
    assert len(frames) == 3
    return frames


@needs_cc
def test_the_c_example_writes_the_frames_of_the_python_codec(tmp_path: Path) -> None:
    frames = _built_by_the_example(tmp_path)
    assert json.loads(frames[0]) == {
        "v": 1,
        "model": "fraud-v3",
        "tensors": [
            {"name": "targets", "datatype": "INT64", "shape": [4]},
            {"name": "ids", "datatype": "UINT64", "shape": [4]},
        ],
    }
    ours = wire.encode("fraud-v3", None, np.array([1, 0, 2, -1]), ids=np.array([2**64 - 1, 42, 2**63, 0], np.uint64))
    assert [bytes(f) for f in ours[1:]] == frames[1:]


@needs_cc
def test_xentd_decodes_the_c_example_as_a_labels_only_message(tmp_path: Path) -> None:
    frames = _built_by_the_example(tmp_path)
    message = wire.decode(frames, max_message_bytes=1 << 20, max_header_bytes=1 << 16)
    assert message.model == "fraud-v3" and set(message.tensors) == {"targets", "ids"}
    assert validate.message_kind(wire.read_header(frames[0], 1 << 16)) is validate.MessageKind.LABELS
    labels = validate.validate_labels(message)
    assert labels.ids.tolist() == [2**64 - 1, 42, 2**63, 0]
    assert np.asarray(message.tensors["targets"].array).tolist() == [1, 0, 2, -1]
