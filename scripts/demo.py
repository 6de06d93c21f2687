"""Record real terminal runs in tmux and assemble ``docs/demo.gif`` (``make demo``).

``make demo`` runs the steps below; each is also a sub-command, so any command can be recorded::

    python scripts/demo.py sample-image OUT.png [--index 0]
    python scripts/demo.py record --out DIR [--ready-url URL --probe-image PNG] -- COMMAND ...
    python scripts/demo.py assemble --out docs/demo.gif ITEM ...

``sample-image`` writes one Fashion-MNIST test image (the configured data source) as a PNG.

``record`` runs COMMAND in a detached tmux pane of a fixed size on a private tmux socket, as a
user would type it, and snapshots the screen (``tmux capture-pane``) every ``--interval-s``
seconds. A command that ends (``make test``) is recorded to its end; one that serves forever
(``make run`` ends in ``make serve``) is recorded until ``--ready-url`` answers 200, then the
``--probe-image`` is posted to ``/predict`` on the same server (so its request log line is on
screen) and the pane gets Ctrl-C, as a user would stop it. Only the first ``--head``, the last
``--tail`` and ``--middle`` evenly spaced snapshots in between are kept, so a 15-minute training
run stays a few seconds of GIF; each frame says how far into the run it was taken. Frames are
rendered to PNG (DejaVu Sans Mono) in ``DIR`` with ``frames.json`` (elapsed seconds, delay).
A command that fails, or that does not get ready within ``--timeout-s``, still leaves its frames
but makes ``record`` exit non-zero, so ``make demo`` never commits a GIF of a broken run.

``assemble`` joins, in order, recorded frame folders and screenshots (PNG files, e.g. the Swagger
UI screenshots of ``tests/test_swagger_ui.py``, letterboxed to the frame size) into one looping GIF
with ImageMagick's ``convert``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")  # Debian fonts-dejavu-core
BACKGROUND = (29, 31, 33)
FOREGROUND = (197, 200, 198)
TITLE_BACKGROUND = (55, 59, 65)
TITLE_FOREGROUND = (240, 198, 116)
PROMPT = (181, 189, 104)
#: Make's own variables would make a ``make`` run inside the pane print "make[1]: ..." lines.
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
FRAMES_FILE = "frames.json"
GO_CHANNEL = "fashion-serve-demo-go"


class DemoError(RuntimeError):
    """A recording or assembly step failed; the message says which and why."""


@dataclass(frozen=True)
class Snapshot:
    """One capture of the terminal screen."""

    elapsed_s: float
    text: str


@dataclass(frozen=True)
class Recording:
    """What ``record`` saw: the snapshots and how the command ended."""

    command: str
    snapshots: list[Snapshot]
    exit_status: int | None  # None: stopped by us (Ctrl-C after the ready check)
    ready_after_s: float | None = None


@dataclass(frozen=True)
class Style:
    """Terminal geometry and look of the rendered frames."""

    columns: int = 110
    rows: int = 30
    font_path: Path = FONT
    font_size: int = 15
    padding: int = 12

    def font(self) -> ImageFont.FreeTypeFont:
        if not self.font_path.exists():
            raise DemoError(f"font {self.font_path} missing: apt-get install fonts-dejavu-core")
        return ImageFont.truetype(str(self.font_path), self.font_size)

    def cell(self) -> tuple[int, int]:
        """Width and height of one character cell in pixels."""
        font = self.font()
        ascent, descent = font.getmetrics()
        return round(font.getlength("M")), ascent + descent + 2

    def title_height(self) -> int:
        return self.cell()[1] + self.padding

    def frame_size(self) -> tuple[int, int]:
        width, height = self.cell()
        return (
            self.columns * width + 2 * self.padding,
            self.rows * height + 2 * self.padding + self.title_height(),
        )


# --------------------------------------------------------------------------- sample image


def sample_image(out: Path, index: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Write Fashion-MNIST test image ``index`` (the configured data source) to ``out`` as PNG."""
    if str(ROOT) not in sys.path:  # run as a script: import this checkout's train package
        sys.path.insert(0, str(ROOT))
    from train.config import load_settings
    from train.data import FASHION_MNIST_FILES, find_fashion_mnist, read_idx

    settings = load_settings(overrides=list(overrides))
    images = read_idx(find_fashion_mnist(settings.data) / FASHION_MNIST_FILES["test_images"])
    if not 0 <= index < len(images):
        raise DemoError(f"--index {index} outside the {len(images)} test images")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[index], mode="L").save(out, "PNG")
    return out


# --------------------------------------------------------------------------- recording


class Tmux:
    """A tmux server on a private socket holding one fixed-size pane that runs one command."""

    def __init__(self, workdir: Path, columns: int, rows: int) -> None:
        self.workdir = workdir
        self.socket = f"fashion-serve-demo-{os.getpid()}-{workdir.name}"
        self.target = "demo"
        self.columns, self.rows = columns, rows
        self.status_file = workdir / "exit-status"
        self.socket_path: Path | None = None

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        if shutil.which("tmux") is None:
            raise DemoError("tmux missing: apt-get install tmux")
        result = subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.workdir / "tmux.conf"), *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"tmux {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        # Set before the pane exists: keep it (and its last screen) after the command ends.
        (self.workdir / "tmux.conf").write_text("set -g remain-on-exit on\nset -g status off\n")
        size = ["-x", str(self.columns), "-y", str(self.rows)]
        shell = pane_command(command, self.status_file)
        self.run("new-session", "-d", "-s", self.target, *size, "-c", str(cwd), shell, env=env)
        # The pane waits for this signal: output written while tmux is still setting the window
        # up can be wiped, and the first line is the command itself.
        self.socket_path = Path(self.run("display-message", "-p", "#{socket_path}").strip())
        self.run("wait-for", "-S", GO_CHANNEL)

    def capture(self) -> str:
        """The screen's text. tmux's "Pane is dead" note scrolls the first line into the history
        when the command ends, so read the history too and keep the last screenful."""
        text = self.run("capture-pane", "-p", "-S", "-", "-t", self.target)
        lines = [line for line in text.splitlines() if not line.startswith("Pane is dead")]
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join(lines[-self.rows :])

    def ended(self) -> bool:
        return self.run("display-message", "-p", "-t", self.target, "#{pane_dead}").strip() == "1"

    def exit_status(self) -> int | None:
        """The command's exit status; None while it runs or when it was interrupted."""
        if not self.ended() or not self.status_file.exists():
            return None
        return int(self.status_file.read_text())

    def interrupt(self) -> None:
        self.run("send-keys", "-t", self.target, "C-c")

    def close(self) -> None:
        if (self.workdir / "tmux.conf").exists():
            subprocess.run(
                ["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False
            )
        if self.socket_path is not None:  # tmux leaves its socket file behind
            self.socket_path.unlink(missing_ok=True)


def pane_command(command: str, status_file: Path) -> str:
    """The pane's shell line: show the command after a prompt, run it, keep its exit status."""
    status = shlex.quote(str(status_file))
    script = (
        f"tmux wait-for {GO_CHANNEL}; printf '$ %s\\n' {shlex.quote(command)}; ( {command} ); s=$?; "
        f"printf '\\n[exit status %d]\\n' $s; echo $s > {status}"
    )
    return f"bash --noprofile --norc -c {shlex.quote(script)}"


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def probe(ready_url: str, image: Path) -> None:
    """POST ``image`` to ``/predict`` next to ``ready_url`` (shows a served request in the log)."""
    url = httpx.URL(ready_url).copy_with(path="/predict")
    response = httpx.post(url, files={"image": (image.name, image.read_bytes())}, timeout=30)
    if response.status_code != 200:
        raise DemoError(f"probe POST {url} answered {response.status_code}: {response.text}")


def record(
    command: str,
    style: Style,
    *,
    interval_s: float = 2.0,
    timeout_s: float = 7200.0,
    ready_url: str | None = None,
    probe_image: Path | None = None,
    linger_s: float = 3.0,
    cwd: Path = ROOT,
) -> Recording:
    """Run ``command`` in a tmux pane and snapshot its screen until it ends (or is ready).

    Raises:
        DemoError: tmux is missing or fails, or the command neither ends nor gets ready in time.
    """
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    env["TERM"] = "xterm-256color"
    snapshots: list[Snapshot] = []
    with tempfile.TemporaryDirectory(prefix="demo-") as workdir:
        tmux = Tmux(Path(workdir), style.columns, style.rows)
        start = time.monotonic()

        def snap() -> None:
            text = tmux.capture()
            if not snapshots or snapshots[-1].text != text:
                snapshots.append(Snapshot(round(time.monotonic() - start, 1), text))

        try:
            tmux.start(command, cwd, env)
            while not tmux.ended():
                snap()
                if ready_url is not None and is_ready(ready_url):
                    ready_after = round(time.monotonic() - start, 1)
                    if probe_image is not None:
                        probe(ready_url, probe_image)
                    time.sleep(linger_s)
                    snap()
                    tmux.interrupt()
                    stop_deadline = time.monotonic() + 60
                    while not tmux.ended() and time.monotonic() < stop_deadline:
                        time.sleep(0.5)
                    snap()
                    return Recording(command, snapshots, None, ready_after)
                if time.monotonic() - start > timeout_s:
                    tmux.interrupt()
                    time.sleep(2)
                    raise DemoError(f"{command!r} did not end or get ready in {timeout_s:.0f}s")
                time.sleep(interval_s)
            snap()
            status = tmux.exit_status()
            return Recording(command, snapshots, 1 if status is None else status)
        finally:
            tmux.close()


def pick(snapshots: Sequence[Snapshot], head: int, middle: int, tail: int) -> list[Snapshot]:
    """The first ``head``, ``middle`` evenly spaced and last ``tail`` snapshots, in order."""
    if len(snapshots) <= head + middle + tail:
        return list(snapshots)
    inner = snapshots[head : len(snapshots) - tail]
    step = len(inner) / (middle + 1)
    chosen = [inner[round(step * (i + 1)) - 1] for i in range(middle)] if middle else []
    return [*snapshots[:head], *chosen, *snapshots[len(snapshots) - tail :]]


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def render(snapshot: Snapshot, title: str, style: Style, out: Path) -> Path:
    """Draw one screen as a terminal window: title bar with the elapsed time, then the text."""
    font = style.font()
    cell_h = style.cell()[1]
    image = Image.new("RGB", style.frame_size(), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, style.title_height()), fill=TITLE_BACKGROUND)
    stamp = f"{clock(snapshot.elapsed_s)} elapsed"
    room = style.columns - len(stamp) - 2
    heading = title if len(title) <= room else title[: room - 1] + "…"
    baseline = style.padding // 2 + 1
    draw.text((style.padding, baseline), heading, font=font, fill=TITLE_FOREGROUND)
    stamp_x = image.width - style.padding - round(font.getlength(stamp))
    draw.text((stamp_x, baseline), stamp, font=font, fill=TITLE_FOREGROUND)
    top = style.title_height() + style.padding
    for row, line in enumerate(snapshot.text.splitlines()[: style.rows]):
        colour = PROMPT if line.startswith("$ ") else FOREGROUND
        draw.text(
            (style.padding, top + row * cell_h), line[: style.columns], font=font, fill=colour
        )
    image.save(out, "PNG")
    return out


def save_frames(
    recording: Recording,
    out_dir: Path,
    style: Style,
    title: str,
    picks: tuple[int, int, int],
    delays_cs: tuple[int, int],
) -> list[Path]:
    """Render the picked snapshots to ``out_dir`` and describe them in ``frames.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("frame-*.png"):
        old.unlink()
    chosen = pick(recording.snapshots, *picks)
    paths: list[Path] = []
    described = []
    for number, snapshot in enumerate(chosen):
        path = render(snapshot, title, style, out_dir / f"frame-{number:03d}.png")
        delay = delays_cs[1] if number == len(chosen) - 1 else delays_cs[0]
        paths.append(path)
        described.append({"file": path.name, "delay_cs": delay, "elapsed_s": snapshot.elapsed_s})
    summary = {
        "command": recording.command,
        "exit_status": recording.exit_status,
        "ready_after_s": recording.ready_after_s,
        "snapshots": len(recording.snapshots),
        "frames": described,
        "last_screen": asdict(recording.snapshots[-1]) if recording.snapshots else None,
    }
    (out_dir / FRAMES_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return paths


# --------------------------------------------------------------------------- assembly


def convert(*args: str) -> None:
    """ImageMagick's ``convert`` with ``args``."""
    binary = os.environ.get("IMAGEMAGICK_CONVERT", "convert")
    if shutil.which(binary) is None:
        raise DemoError(f"{binary} missing: apt-get install imagemagick")
    result = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"convert {' '.join(args)} failed: {result.stderr.strip()}")


def assemble(items: Sequence[Path], out: Path, style: Style, screenshot_delay_cs: int) -> Path:
    """One looping GIF of frame folders (``record`` output) and PNG screenshots, in order."""
    width, height = style.frame_size()
    background = "#{:02x}{:02x}{:02x}".format(*BACKGROUND)
    arguments: list[str] = []
    workdir = out.parent / f".{out.stem}-frames"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for number, item in enumerate(items):
            if item.is_dir():
                summary = json.loads((item / FRAMES_FILE).read_text())
                for frame in summary["frames"]:
                    arguments += ["-delay", str(frame["delay_cs"]), str(item / frame["file"])]
            elif item.suffix.lower() == ".png":
                fitted = workdir / f"shot-{number:02d}.png"
                convert(
                    str(item),
                    *("-resize", f"{width}x{height}", "-background", background),
                    *("-gravity", "center", "-extent", f"{width}x{height}", str(fitted)),
                )
                arguments += ["-delay", str(screenshot_delay_cs), str(fitted)]
            else:
                raise DemoError(f"{item} is neither a recorded frame folder nor a .png")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(*arguments, "-loop", "0", "-layers", "Optimize", str(out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n")[0])
    cli.add_argument("--columns", type=int, default=Style.columns, help="terminal width")
    cli.add_argument("--rows", type=int, default=Style.rows, help="terminal height")
    cli.add_argument("--font", type=Path, default=FONT, help="a monospace TrueType font")
    cli.add_argument("--font-size", type=int, default=Style.font_size)
    steps = cli.add_subparsers(dest="step", required=True)

    sample = steps.add_parser("sample-image", help="a Fashion-MNIST test image as PNG")
    sample.add_argument("out", type=Path)
    sample.add_argument("--index", type=int, default=0)

    rec = steps.add_parser("record", help="record COMMAND in tmux into frames")
    rec.add_argument("--out", type=Path, required=True, help="folder for frames and frames.json")
    rec.add_argument("--title", help="title bar text (default: $ COMMAND)")
    rec.add_argument("--ready-url", help="stop (Ctrl-C) once this URL answers 200")
    rec.add_argument("--probe-image", type=Path, help="POST this PNG to /predict once ready")
    rec.add_argument("--interval-s", type=float, default=2.0, help="seconds between snapshots")
    rec.add_argument("--timeout-s", type=float, default=7200.0)
    rec.add_argument("--linger-s", type=float, default=3.0, help="seconds shown after ready")
    rec.add_argument("--head", type=int, default=3, help="first snapshots kept")
    rec.add_argument("--middle", type=int, default=4, help="evenly spaced snapshots kept")
    rec.add_argument("--tail", type=int, default=3, help="last snapshots kept")
    rec.add_argument("--delay-cs", type=int, default=70, help="frame time, 1/100 s")
    rec.add_argument("--last-delay-cs", type=int, default=300, help="last frame time, 1/100 s")
    rec.add_argument("command", nargs="+", help="the command line (after --)")

    join = steps.add_parser("assemble", help="frame folders and PNG screenshots → GIF")
    join.add_argument("--out", type=Path, required=True)
    join.add_argument("--screenshot-delay-cs", type=int, default=350)
    join.add_argument("items", type=Path, nargs="+")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = parser().parse_args(argv)
    style = Style(
        columns=args.columns, rows=args.rows, font_path=args.font, font_size=args.font_size
    )
    try:
        if args.step == "sample-image":
            print(sample_image(args.out, args.index))
            return 0
        if args.step == "assemble":
            out = assemble(args.items, args.out, style, args.screenshot_delay_cs)
            print(f"{out}: {out.stat().st_size / 1024:.0f} KiB")
            return 0
        command = " ".join(args.command)
        recording = record(
            command,
            style,
            interval_s=args.interval_s,
            timeout_s=args.timeout_s,
            ready_url=args.ready_url,
            probe_image=args.probe_image,
            linger_s=args.linger_s,
        )
        frames = save_frames(
            recording,
            args.out,
            style,
            args.title or f"$ {command}",
            (args.head, args.middle, args.tail),
            (args.delay_cs, args.last_delay_cs),
        )
        print(f"{len(frames)} frames of {len(recording.snapshots)} snapshots → {args.out}")
        if recording.exit_status not in (None, 0):
            print(f"error: {command!r} exited with {recording.exit_status}", file=sys.stderr)
            return 1
        return 0
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
