"""The error tree of all three programs and the contract errors. Two roots under KestrelError:

* ArtifactError: something we were given is bad (config, bundle, model, frame). Retrying the
  same input will not help; the message says what to fix.
* TransportError: something we talk to is unavailable (broker, hub, camera stream). Retrying
  later may help.

Every error Kestrel raises derives from one of the two: the contract errors here (config, bundle,
key file, hub refusals and reachability) and each program's own in its errors module (edge.errors,
hub.errors, trainer.errors). Third-party errors (paho, grpc, TFLite, OpenCV, pymongo) are wrapped at
the boundary with ``raise OurError(...) from exc`` so callers only ever catch ours. ``run_command``
turns them into one line and an exit code for every CLI.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional


class KestrelError(Exception):
    """Root of every Kestrel error."""


class ArtifactError(KestrelError):
    """Bad input: a file, payload or setting that is wrong and will stay wrong."""


class ConfigError(ArtifactError):
    """A configuration file or value is invalid."""


class BundleError(ArtifactError):
    """A model bundle failed verification; ``reason`` is a short machine-readable code."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason




class DesiredRefused(ArtifactError):
    """A desired-state message failed its signature, expiry or replay check (proto.desired);
    ``reason`` is one of proto.desired.REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class TransportError(KestrelError):
    """Something we talk to is unreachable or refused us; retrying later may help."""






class KeyFileError(ArtifactError):
    """A key file is missing, malformed or unsafely readable."""


class HubRefused(ArtifactError):
    """The hub answered and refused the request; ``code`` is the gRPC status name."""

    def __init__(self, code: str, detail: str, what: str = "") -> None:
        super().__init__(f"{what + ': ' if what else ''}hub refused ({code}): {detail}")
        self.code = code
        self.detail = detail


class HubTlsError(ArtifactError):
    """The TLS handshake with the hub failed: its certificate is not signed by the CA we were given (or does
    not name the address we dialled, or the port speaks no TLS). The CA file or the address is wrong:
    retrying will not help (exit 2; docs/security.md)."""


class HubError(TransportError):
    """The hub's gRPC service is unreachable or answered with an error."""



EXIT_OTHER = 1        # a KestrelError with neither root (should not happen), or a bug
EXIT_ARTIFACT = 2     # bad input: fix it, retrying will not help
EXIT_TRANSPORT = 3    # something we talk to is unavailable: retry later
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
DEBUG_ENV = "KESTREL_DEBUG"  # =1 (or a command's --debug): an unexpected error shows its traceback, not one line
DEBUG_HELP = "show the full traceback of an unexpected error (or set KESTREL_DEBUG=1)"
_FIRST_LINE_CHARS = 300


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:_FIRST_LINE_CHARS] if text else ""


def run_command(what: str, body: Callable[[], Optional[int]], debug: bool = False) -> int:
    """Run a command's body and return its exit code; every error becomes one line on stderr
    (``what: error: message``):

    * a KestrelError: the exit code of its root (2 bad input, 3 something unavailable);
    * an OSError the command did not wrap (disk full, permissions, a path that is a file): 2;
    * Ctrl-C: ``what: interrupted``, EXIT_INTERRUPTED;
    * anything else is a bug: 1, unless ``debug`` (every command's --debug) or KESTREL_DEBUG=1 asks for the
      traceback.
    """
    try:
        return int(body() or 0)
    except ArtifactError as exc:
        print(f"{what}: error: {exc}", file=sys.stderr)
        return EXIT_ARTIFACT
    except TransportError as exc:
        print(f"{what}: error: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    except KestrelError as exc:  # every error has one of the two roots; kept as a safety net
        print(f"{what}: error: {exc}", file=sys.stderr)
        return EXIT_OTHER
    except KeyboardInterrupt:
        print(f"{what}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{what}: error: cannot access{where}: {exc.strerror or _first_line(exc)}; check the path, "
              "its permissions and free space", file=sys.stderr)
        return EXIT_ARTIFACT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug or os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{what}: error: unexpected {type(exc).__name__}: {_first_line(exc)} (a bug: rerun with "
              f"--debug or {DEBUG_ENV}=1 for the traceback and report it)", file=sys.stderr)
        return EXIT_OTHER
