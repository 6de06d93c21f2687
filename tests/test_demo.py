"""``scripts/demo.py`` (``make demo``): real tmux recordings and a real ImageMagick GIF, kept tiny.

Needs Debian's ``tmux``, ``imagemagick`` and ``fonts-dejavu-core`` (Makefile ``TEST_APT_PACKAGES``, ``make test-deps``).
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load_demo() -> ModuleType:
    """``scripts/demo.py`` as a module (``scripts`` is not a package)."""
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_script"] = module
    spec.loader.exec_module(module)
    return module


demo = load_demo()
STYLE = demo.Style(columns=100, rows=10)


def snapshots(count: int) -> list[object]:
    return [demo.Snapshot(float(i), f"screen {i}") for i in range(count)]


def test_pick_keeps_head_tail_and_evenly_spaced_middle() -> None:
    shots = snapshots(20)
    picked = demo.pick(shots, 2, 3, 2)
    assert [s.text for s in picked] == [
        "screen 0",
        "screen 1",
        "screen 5",
        "screen 9",
        "screen 13",
        "screen 18",
        "screen 19",
    ]
    assert demo.pick(shots[:5], 2, 3, 2) == shots[:5]
    assert [s.text for s in demo.pick(shots, 1, 0, 1)] == ["screen 0", "screen 19"]


def test_record_shows_the_command_its_output_and_exit_status() -> None:
    recording = demo.record("echo first; echo second; exit 3", STYLE, interval_s=0.2, cwd=ROOT)
    assert recording.exit_status == 3
    assert recording.ready_after_s is None
    assert recording.snapshots[-1].text.splitlines() == [
        "$ echo first; echo second; exit 3",
        "first",
        "second",
        "",
        "[exit status 3]",
    ]


def test_record_stops_a_server_once_it_is_ready(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = f"{sys.executable} -m http.server --bind 127.0.0.1 {port}"
    recording = demo.record(
        command,
        STYLE,
        interval_s=0.2,
        timeout_s=60,
        ready_url=f"http://127.0.0.1:{port}/",
        linger_s=0.5,
        cwd=tmp_path,
    )
    assert recording.exit_status is None  # interrupted by us, as a user stops make serve
    assert recording.ready_after_s is not None
    screen = recording.snapshots[-1].text
    assert "GET / HTTP/1.1" in screen
    assert "Keyboard interrupt received" in screen


def test_record_gives_up_after_the_timeout() -> None:
    with pytest.raises(demo.DemoError, match="did not end or get ready"):
        demo.record("sleep 30", STYLE, interval_s=0.2, timeout_s=1, cwd=ROOT)


def test_frames_and_screenshot_become_one_gif(tmp_path: Path) -> None:
    recording = demo.Recording("echo hi", snapshots(6), 0)
    frames = demo.save_frames(recording, tmp_path / "run", STYLE, "$ echo hi", (1, 1, 1), (50, 200))
    assert [p.name for p in frames] == ["frame-000.png", "frame-001.png", "frame-002.png"]
    with Image.open(frames[0]) as first:
        assert first.size == STYLE.frame_size()
    screenshot = tmp_path / "shot.png"
    Image.fromarray(np.full((300, 500, 3), 200, dtype=np.uint8)).save(screenshot)

    gif = demo.assemble([tmp_path / "run", screenshot], tmp_path / "demo.gif", STYLE, 300)
    with Image.open(gif) as image:
        assert image.format == "GIF"
        assert getattr(image, "n_frames", 1) == 4
        assert image.size == STYLE.frame_size()
        image.seek(3)
        assert image.info["duration"] == 3000
    assert not (tmp_path / ".demo-frames").exists()


def test_assemble_refuses_what_is_not_a_frame_folder_or_png(tmp_path: Path) -> None:
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(demo.DemoError, match="neither"):
        demo.assemble([stray], tmp_path / "demo.gif", STYLE, 300)


def test_sample_image_writes_a_fashion_mnist_test_image(tmp_path: Path, fmnist_dir: Path) -> None:
    out = demo.sample_image(tmp_path / "boot.png", 2, [f"data.path={fmnist_dir}"])
    from train.data import FASHION_MNIST_FILES, read_idx

    expected = read_idx(fmnist_dir / FASHION_MNIST_FILES["test_images"])[2]
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert np.array_equal(np.asarray(image), expected)
    with pytest.raises(demo.DemoError, match="outside"):
        demo.sample_image(tmp_path / "x.png", 10_000, [f"data.path={fmnist_dir}"])


def test_cli_records_and_reports_a_failing_command(tmp_path: Path) -> None:
    status = demo.main(
        [
            *("--columns", "40", "--rows", "6", "record", "--out", str(tmp_path / "rec")),
            *("--interval-s", "0.2", "--", "echo", "oops;", "false"),
        ]
    )
    assert status == 1
    summary = (tmp_path / "rec" / demo.FRAMES_FILE).read_text()
    assert '"exit_status": 1' in summary
    assert "oops" in summary
