"""What a person sees while fra runs, and the run's log file that holds everything else.

A command that runs Ray work (``fra run``, ``pretrain``, ``evaluate``, ``tune``) calls
:meth:`Console.log_to` once it knows its storage. From then on the console is *quiet*:

- the terminal shows fra's own lines (:func:`echo`: one line per stage start and end, the
  final summary table), warnings and errors from fra's loggers, errors from any logger, and a
  progress display of the long stages (step or epoch, images/s, loss, ETA);
- everything else written to ``sys.stdout`` / ``sys.stderr`` in this process goes to the run's
  log file ``<storage>/logs/<command>-<time>.log`` instead: Ray's driver log lines (token
  authentication, "Started a local Ray instance", Ray Data's plans and progress summaries),
  the lines Ray's log monitor forwards from every worker (Train's controller and reports,
  Ray Data's coordinators, fra's own per-step worker lines, deprecation warnings), MLflow's
  and Python's warnings. fra's log records go there too, with timestamps. ``fra -v`` shows all
  of it on the terminal as well.

Errors still surface in full: a failed run raises, and its message (with the worker's
traceback that Ray Train puts into it) is printed; the log file has the rest.

**Progress.** Workers do not print the display (Ray forwards worker output through its log
monitor, line by line, prefixed and deduplicated). Rank 0 calls :func:`report_progress`, which
puts a small JSON record into Ray's key-value store under this job's id; the driver polls it
twice a second and draws one line that it rewrites in place on a terminal, or prints a line
per epoch (at most one every :data:`PLAIN_EVERY_S` otherwise) when the output is a file or pipe.

Everything written to the terminal or the log file is redacted (:func:`fra.redaction.redact_text`).
Ray is imported lazily: the module is cheap for commands that never start Ray.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from fra.redaction import redact_text

log = logging.getLogger(__name__)

PROGRESS_MODES = ("auto", "live", "lines", "off")
KV_NAMESPACE = "fra_progress"
POLL_S = 0.5  # the driver's progress poll
PLAIN_EVERY_S = 30.0  # lines mode: at most one progress line per task this often, besides epoch changes
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_current: "Console | None" = None


# ---- worker side -----------------------------------------------------------------------------
def report_progress(task: str, done: int, total: int, unit: str = "step", **fields) -> None:
    """Publish where a long loop is, for the driver's progress display (never raises).

    Args:
        task: the display's label ("pretrain", "evaluate").
        done, total: units done so far and planned (the ETA is computed from their rate).
        unit: "step" or "epoch".
        fields: shown as given, e.g. ``epoch=2, epochs=8, loss=3.49, images_per_s=13.4, top1=50.0``.
    """
    try:
        import ray
        from ray.experimental.internal_kv import _internal_kv_initialized, _internal_kv_put

        if not ray.is_initialized() or not _internal_kv_initialized():
            return
        record = {"task": task, "done": int(done), "total": int(total), "unit": unit, "t": time.time(),
                  **{k: v for k, v in fields.items() if isinstance(v, (int, float, str)) and v == v}}
        _internal_kv_put(_key(ray.get_runtime_context().get_job_id(), task), json.dumps(record), overwrite=True,
                         namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - progress is a display; training never fails for it
        log.debug("progress not published: %s", exc)


def _key(job_id: str, task: str = "") -> str:
    return f"{job_id}/{task}"


# ---- driver side -----------------------------------------------------------------------------
def current() -> "Console | None":
    """The console of the running ``fra`` command, if any."""
    return _current


def echo(text: str = "") -> None:
    """A line of fra's own output: through the console when a command runs, else ``print``."""
    if _current is not None:
        _current.echo(text)
    else:
        print(text)


def error(text: str) -> None:
    """An error line of fra's own: the console's stderr when a command runs, else ``sys.stderr``."""
    if _current is not None:
        _current.error(text)
    else:
        print(text, file=sys.stderr)


@contextlib.contextmanager
def session(verbose: bool = False, progress: str = "auto") -> Iterator["Console"]:
    """The console of one ``fra`` command (see the module docstring); restores everything on exit."""
    global _current
    con = Console(verbose=verbose, progress=progress)
    previous, _current = _current, con
    con.open()
    try:
        yield con
    except BaseException as exc:
        con.record_exception(exc)
        raise
    finally:
        con.close()
        _current = previous


def on_ray_init(kind: str) -> None:
    """Called by :func:`fra.ray_runtime.init_ray`: a quiet console starts its progress display and,
    where fra started or joined Ray here (``kind`` "local"/"joined"), shuts it down at the end, so
    that Ray's last forwarded lines still reach the log file."""
    if _current is not None:
        _current.ray_ready(own=kind in ("local", "joined"))


class _Stream:
    """``sys.stdout`` / ``sys.stderr`` while a console is open: redacted, and while the console is
    quiet, diverted to the log file (and, with ``-v``, also shown)."""

    def __init__(self, console: "Console", term: TextIO, name: str):
        self.console, self.term, self.name = console, term, name
        self._partial = ""

    def write(self, text: str) -> int:
        if not text:
            return 0
        con = self.console
        if con.capturing:
            with con.lock:
                self._partial += text
                *lines, self._partial = self._partial.split("\n")
            for line in lines:
                con.foreign_line(line, self.term)
        else:
            con.term_write(self.term, redact_text(text))
        return len(text)

    def flush(self) -> None:
        try:
            self.term.flush()
        except (OSError, ValueError):
            pass

    def drain(self) -> None:
        if self._partial:
            line, self._partial = self._partial, ""
            self.console.foreign_line(line, self.term)

    def __getattr__(self, name: str):
        return getattr(self.term, name)


class _ConsoleHandler(logging.Handler):
    """Log records on the terminal: quiet: fra's warnings and anyone's errors; else all (INFO+)."""

    def __init__(self, console: "Console"):
        super().__init__(logging.DEBUG)
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        con = self.console
        fra = record.name == "fra" or record.name.startswith("fra.")
        if con.verbose:
            return record.levelno >= (logging.DEBUG if fra else logging.INFO)
        if con.capturing:
            return record.levelno >= (logging.WARNING if fra else logging.ERROR)
        return record.levelno >= logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        try:
            con = self.console
            if con.capturing and not con.verbose:
                text = f"{record.levelname.lower()}: {record.getMessage()}"
                if record.exc_info:
                    text += "\n" + logging.Formatter().formatException(record.exc_info)
            else:
                text = self.format(record)
            con.term_write(con.err, redact_text(text) + "\n")
        except Exception:  # noqa: BLE001
            self.handleError(record)


class _FileHandler(logging.Handler):
    """Every log record (fra's DEBUG with ``-v``, else INFO and up) into the run's log file."""

    def __init__(self, console: "Console"):
        super().__init__(logging.DEBUG)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or record.name == "fra" or record.name.startswith("fra.")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.file_line(self.format(record))
        except Exception:  # noqa: BLE001
            self.handleError(record)


class Console:
    """One command's console: terminal streams, the log file, the progress display."""

    def __init__(self, verbose: bool = False, progress: str = "auto"):
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {progress!r}")
        self.verbose, self.progress_mode = verbose, progress
        self.lock = threading.RLock()
        self.capturing = False
        self.log_path: str = ""  # where the log ends up (a local path, or a URI it is copied to)
        self._file = None
        self._local_log: Path | None = None
        self._own_ray = False
        self._live = ""  # the progress line currently drawn on the terminal (live mode)
        self._progress: _ProgressDisplay | None = None
        self._saved: tuple = ()
        self._adopted: list[tuple[logging.Logger, list[logging.Handler]]] = []

    # -- set-up -------------------------------------------------------------------------------
    def adopt_loggers(self) -> None:
        """Route the loggers of libraries that print for themselves (Ray and MLflow install a stream
        handler on their logger and stop propagation) through the console's handlers, so their
        records reach the log file and their errors the terminal whatever the import order was.
        Called when the console opens, when Ray starts and at each fra line; undone in :meth:`close`."""
        for logger in list(logging.Logger.manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger) or logger.propagate:
                continue
            own = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
            if own:
                for h in own:
                    logger.removeHandler(h)
                logger.propagate = True
                self._adopted.append((logger, own))

    def open(self) -> None:
        self.out, self.err = sys.stdout, sys.stderr
        self._streams = (_Stream(self, self.out, "stdout"), _Stream(self, self.err, "stderr"))
        sys.stdout, sys.stderr = self._streams
        root = logging.getLogger()
        self._handlers = [_ConsoleHandler(self)]
        self._handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                                         "%H:%M:%S"))
        self._saved = (root.level,)
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        root.addHandler(self._handlers[0])
        self.adopt_loggers()

    def log_to(self, storage: str, label: str) -> str:
        """Open the run's log file under ``<storage>/logs/`` and turn the console quiet.

        A storage URI gets a local file in fra's cache, copied next to the run when the command
        ends. Returns where the log is (shown on the first line).
        """
        from fra import storage as st

        if self._file is not None:
            return self.log_path
        name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        storage = st.absolute(storage)
        if st.is_uri(storage):
            self._local_log = st.cache_root() / "logs" / name
            self.log_path = st.join(storage, "logs", name)
        else:
            self._local_log = Path(storage) / "logs" / name
            self.log_path = str(self._local_log)
        self._local_log.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._local_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
        handler = _FileHandler(self)
        logging.getLogger().addHandler(handler)
        self._handlers.append(handler)
        self.capturing = True
        self.echo(f"log: {st.redact(self.log_path)}" + ("" if self.verbose else "  (fra -v shows it here too)"))
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # e.g. a test session's Ray: fra does not own it
            self.ray_ready(own=False)
        return self.log_path

    def ray_ready(self, own: bool) -> None:
        self._own_ray = self._own_ray or own
        self.adopt_loggers()
        if not self.capturing:
            return
        mode = self.progress_mode
        if mode == "auto":
            mode = "live" if _isatty(self.out) and not self.verbose else "lines"
        if mode != "off" and self._progress is None:
            self._progress = _ProgressDisplay(self, live=mode == "live")
            self._progress.start()

    def configure(self, verbose: bool = False, progress: str = "auto") -> None:
        """Set verbosity and progress mode (``fra -v``, ``--progress``) once the arguments are parsed."""
        if progress not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {progress!r}")
        self.verbose, self.progress_mode = verbose, progress
        logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)

    # -- output -------------------------------------------------------------------------------
    def echo(self, text: str = "") -> None:
        """fra's own line(s): on the terminal (stdout), and in the log file."""
        self.adopt_loggers()  # a library imported since the last line (e.g. MLflow by a stage)
        if self._progress is not None:
            self._progress.new_section()
        self.term_write(self.out, redact_text(text) + "\n")
        for line in str(text).splitlines() or [""]:
            self.file_line(f"{time.strftime('%Y-%m-%d %H:%M:%S')} fra: {line}")

    def error(self, text: str) -> None:
        self.term_write(self.err, redact_text(text) + "\n")
        self.file_line(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR fra: {text}")

    def term_write(self, stream: TextIO, text: str) -> None:
        with self.lock:
            self._clear_live()
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                pass

    def foreign_line(self, line: str, stream: TextIO) -> None:
        """A line someone else printed while quiet: into the log file; with -v, also shown."""
        self.file_line(_ANSI.sub("", line))
        if self.verbose:
            self.term_write(stream, redact_text(line) + "\n")

    def file_line(self, line: str) -> None:
        with self.lock:
            if self._file is not None:
                try:
                    self._file.write(redact_text(line).rstrip("\r") + "\n")
                except (OSError, ValueError):
                    pass

    def draw_live(self, text: str) -> None:
        """Live mode: (re)draw the progress line in place."""
        with self.lock:
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            text = redact_text(text)[:width]
            try:
                self.out.write("\r\x1b[K" + text)
                self.out.flush()
            except (OSError, ValueError):
                return
            self._live = text

    def _clear_live(self) -> None:
        if self._live:
            try:
                self.out.write("\r\x1b[K")
            except (OSError, ValueError):
                pass
            self._live = ""

    # -- end ----------------------------------------------------------------------------------
    def record_exception(self, exc: BaseException) -> None:
        import traceback

        self.file_line("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._own_ray and self.capturing:
            try:  # inside the capture: Ray's last forwarded lines and shutdown messages go to the log
                import ray

                ray.shutdown()
            except Exception as exc:  # noqa: BLE001
                self.file_line(f"ray.shutdown failed: {exc}")
        for s in self._streams:
            s.drain()
        with self.lock:
            self._clear_live()
        sys.stdout, sys.stderr = self.out, self.err
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
        root.setLevel(self._saved[0])
        for logger, own in reversed(self._adopted):
            logger.propagate = False
            for h in own:
                logger.addHandler(h)
        self._adopted.clear()
        self.capturing = False
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._local_log is not None and self.log_path != str(self._local_log):
                try:
                    from fra import storage as st

                    st.write_bytes(self.log_path, self._local_log.read_bytes())
                except Exception as exc:  # noqa: BLE001 - the local copy stays
                    print(f"fra: could not copy the log to {self.log_path} ({exc}); it is in {self._local_log}",
                          file=self.err)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _ProgressDisplay(threading.Thread):
    """The driver's poller: reads this job's progress records and draws them (module docstring)."""

    def __init__(self, console: Console, live: bool):
        super().__init__(name="fra-progress", daemon=True)
        self.console, self.live = console, live
        self._stop_event = threading.Event()
        self._seen: dict[str, str] = {}  # task -> the raw record last read
        self._since = time.time()  # records written before the current stage started are not shown
        self._rate: dict[str, tuple[int, float]] = {}  # task -> (done, time) of its first fresh record
        self._last_change: dict[str, float] = {}
        self._printed: dict[str, tuple[float, object]] = {}  # lines mode: task -> (time, epoch) of last line
        self._job = ""

    def new_section(self) -> None:
        """A stage line was printed: what was shown so far belongs to the previous stage."""
        with self.console.lock:
            self._since = time.time()
            self._rate.clear()
            self._printed.clear()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        try:
            import ray
            from ray.experimental.internal_kv import _internal_kv_del

            if ray.is_initialized() and self._job:
                _internal_kv_del(_key(self._job), del_by_prefix=True, namespace=KV_NAMESPACE)
        except Exception:  # noqa: BLE001 - leftover records are a few bytes in this job's namespace
            pass

    def run(self) -> None:
        while not self._stop_event.wait(POLL_S):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - the display must never break a run
                self.console.file_line(f"progress display: {type(exc).__name__}: {exc}")
                self._stop_event.wait(5)

    def _tick(self) -> None:
        import ray
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

        if not ray.is_initialized():
            return
        self._job = self._job or ray.get_runtime_context().get_job_id()
        records = []
        for key in sorted(_internal_kv_list(_key(self._job), namespace=KV_NAMESPACE) or []):
            raw = _internal_kv_get(key, namespace=KV_NAMESPACE)
            if raw is not None:
                records.append((key.decode() if isinstance(key, bytes) else key, raw.decode()))
        with self.console.lock:
            self._show(records, time.time())

    def _show(self, records: list[tuple[str, str]], now: float) -> None:
        fresh = []
        for k, raw in records:
            if raw != self._seen.get(k):
                self._seen[k] = raw
                self._last_change[k] = now
            rec = json.loads(raw)
            if rec.get("t", 0.0) < self._since:
                continue  # the previous stage's last record
            self._rate.setdefault(k, (rec["done"], self._last_change[k]))
            fresh.append((k, rec))
        if not fresh:
            return
        if self.live:
            self.console.draw_live("  " + "  |  ".join(self._line(k, r, now) for k, r in fresh))
            return
        for k, rec in fresh:
            last_t, last_epoch = self._printed.get(k, (0.0, None))
            epoch = rec.get("epoch", rec["done"] if rec["unit"] == "epoch" else None)
            changed = self._last_change[k] > last_t
            if changed and (epoch != last_epoch or now - last_t >= PLAIN_EVERY_S or rec["done"] >= rec["total"]):
                self._printed[k] = (now, epoch)
                self.console.term_write(self.console.out, "  " + self._line(k, rec, now) + "\n")
                self.console.file_line(f"{time.strftime('%Y-%m-%d %H:%M:%S')} progress: {self._line(k, rec, now)}")

    def _line(self, key: str, rec: dict, now: float) -> str:
        return format_progress(rec, eta_seconds(self._rate.get(key), rec, self._last_change.get(key, now), now))


def eta_seconds(first: tuple[int, float] | None, rec: dict, seen_at: float, now: float) -> float | None:
    """Seconds left: the units still to do at the rate observed since ``first`` = (done, time),
    counted down from when the latest record arrived; None before two distinct observations."""
    if first is None:
        return None
    done0, t0 = first
    if rec["done"] >= rec["total"]:
        return 0.0
    if rec["done"] <= done0 or seen_at <= t0:
        return None
    rate = (rec["done"] - done0) / (seen_at - t0)
    return max(0.0, (rec["total"] - rec["done"]) / rate - (now - seen_at))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def format_progress(rec: dict, eta: float | None) -> str:
    """One progress line, e.g. ``pretrain  step 20/30  epoch 2/2  loss 3.493  13.4 img/s  ETA 0:12``."""
    parts = [rec["task"], f"{rec['unit']} {rec['done']}/{rec['total']}"]
    if rec["unit"] != "epoch" and "epoch" in rec:
        parts.append(f"epoch {rec['epoch']}" + (f"/{rec['epochs']}" if "epochs" in rec else ""))
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4g}")
    if "top1" in rec:
        parts.append(f"top-1 {rec['top1']:.1f}%")
    if "images_per_s" in rec:
        parts.append(f"{rec['images_per_s']:.1f} img/s")
    parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain aligned text table (the last column is left ragged)."""
    cells = [headers, *rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers) - 1)]
    out = []
    for r in cells:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]))
    out.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(headers[-1]))
    return "\n".join(line.rstrip() for line in out)


__all__ = ["report_progress", "session", "current", "echo", "error", "on_ray_init", "Console", "table", "format_progress",
           "format_duration", "eta_seconds", "PROGRESS_MODES"]
