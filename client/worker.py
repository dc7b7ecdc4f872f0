"""The site's warm worker: one long-lived process that answers its node's messages.

Flower 1.41's SuperNode starts a new `flwr-clientapp` process for every message. Answering in that
process paid Python's start-up, torch's imports, the scenario and the site's windows again every
round: about 22 s of a round's 45 s of overhead on a loaded machine (docs/performance.md, round
overhead). The worker imports all that once and keeps the site's windows in memory; the
per-message ClientApp (client/app.py, which imports no torch) only hands it the message over a
local Unix socket and returns its reply.

    python -m client.worker --socket /srv/fedssl/state/worker.sock [--site-file site.yaml]

The SuperNode names the socket in its node config (`worker-socket='/srv/fedssl/state/worker.sock'`);
without that key (simulation), or with no worker listening, the ClientApp answers in its own
process. The socket file is made with mode 0600: only the site's own user can connect. The worker
answers one message at a time, by `client.site_round.respond` as the ClientApp would, until SIGTERM.

On the socket each side sends frames (an 8-byte big-endian length, then the bytes) of Flower's own
protobuf serialisation: the ClientApp the Context (run id, run and node config) and the Message,
the worker a Message holding the reply's content or its Error.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import log
from flwr.common.serde import (context_from_proto, context_to_proto, error_from_proto, error_to_proto,
                               message_to_proto, recorddict_from_proto, recorddict_to_proto)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from google.protobuf.message import DecodeError

from fedssl.protocol import SITE_ERROR_CODE

if TYPE_CHECKING:
    from fedssl.data.windows import WindowSet

SOCKET_KEY = "worker-socket"  # node config: the socket of the node's worker
FRAME_HEADER = struct.Struct(">Q")  # a frame's length in bytes
REQUEST_TIMEOUT_SECONDS = 60.0  # the worker's wait for each read or write of a request's bytes


class WorkerUnreachable(ConnectionError):
    """No worker took the message: the ClientApp answers it in its own process."""


class WorkerError(RuntimeError):
    """The worker cannot serve at the socket it was given."""


# -- the ClientApp's side -----------------------------------------------------------------------

def ask_worker(path: str, msg: Message, context: Context) -> RecordDict | Error:
    """The worker's reply to `msg`, or WorkerUnreachable if no worker takes it.

    Once the worker has the message, a failure (it died, garbled its reply, or did not answer
    within the message's time to live) is an Error reply: the worker may have done part of the
    work, such as spending privacy budget, so the message is not answered a second time here.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(path)
        except OSError as err:
            raise WorkerUnreachable(f"no site worker at {path} ({err.strerror or err})") from None
        connection.settimeout(msg.metadata.ttl)
        try:
            send_frame(connection, context_to_proto(context).SerializeToString())
            send_frame(connection, message_to_proto(msg).SerializeToString())
            reply = ProtoMessage.FromString(receive_frame(connection))
        except (OSError, DecodeError) as err:
            log(ERROR, "fedssl | the site worker at %s failed on a %s message: %s: %s", path,
                msg.metadata.message_type, type(err).__name__, err)
            return Error(code=SITE_ERROR_CODE, reason=f"site worker: {type(err).__name__} (details in the site's log)")
    return error_from_proto(reply.error) if reply.HasField("error") else recorddict_from_proto(reply.content)


def send_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(FRAME_HEADER.pack(len(payload)) + payload)


def receive_frame(connection: socket.socket) -> bytes:
    (size,) = FRAME_HEADER.unpack(receive_exactly(connection, FRAME_HEADER.size))
    return receive_exactly(connection, size)


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = connection.recv_into(view[received:])
        if count == 0:
            raise ConnectionResetError(f"the other side closed the connection after {received} of {size} bytes")
        received += count
    return bytes(buffer)


# -- the worker's side --------------------------------------------------------------------------

def serve(path: Path, site: str | None = None) -> None:
    """Answer the messages that reach `path` until SIGTERM; `site` names the site in the log."""
    listener = listen(path)  # first: a socket it cannot serve stops the worker before the imports
    signal.signal(signal.SIGTERM, stop)
    try:
        from client import site_round  # torch, opacus and the site's code: imported once, here

        site_round.load_site = WindowCache(site_round.load_site)
        log(INFO, "fedssl | site worker%s ready at %s (pid %d)", f" of {site}" if site else "", path, os.getpid())
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(REQUEST_TIMEOUT_SECONDS)
                answer(connection, site_round.respond)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        log(INFO, "fedssl | site worker at %s stopped", path)


def stop(signum: int, frame) -> None:
    """SIGTERM: leave the serving loop, even mid-message (the ClientApp then replies with an Error)."""
    raise SystemExit(0)


def listen(path: Path) -> socket.socket:
    """A socket listening at `path` that only this user can connect to (mode 0600 as it is made).
    The socket file of a worker that was killed is replaced; that of one still serving is not."""
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise WorkerError(f"another worker already serves {path}")
        path.unlink()
    elif path.exists():
        raise WorkerError(f"{path} exists and is not a socket; choose another --socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as err:
        listener.close()
        raise WorkerError(f"cannot listen at {path}: {err.strerror or err}") from None
    finally:
        os.umask(umask)
    listener.listen()
    return listener


def answer(connection: socket.socket, respond: Callable[..., RecordDict | Error]) -> None:
    """Read one request from `connection`, answer it with `respond` and send the reply back."""
    started = time.perf_counter()
    try:
        context = context_from_proto(ProtoContext.FromString(receive_frame(connection)))
        message = ProtoMessage.FromString(receive_frame(connection))
    except (OSError, DecodeError) as err:
        log(WARNING, "fedssl | site worker: no readable request: %s: %s", type(err).__name__, err)
        return
    kind = message.metadata.message_type
    try:
        reply = respond(kind, recorddict_from_proto(message.content), context.run_config, context.node_config,
                        context.run_id)
    except Exception as err:  # noqa: BLE001 - respond reports the site's own failures; this is a bad request
        log(ERROR, "fedssl | site worker: %s message: %s: %s\n%s", kind, type(err).__name__, err, traceback.format_exc())
        reply = Error(code=SITE_ERROR_CODE, reason=f"site worker: {type(err).__name__} (details in the site's log)")
    proto = (ProtoMessage(error=error_to_proto(reply)) if isinstance(reply, Error)
             else ProtoMessage(content=recorddict_to_proto(reply)))
    try:
        send_frame(connection, proto.SerializeToString())
    except OSError as err:
        log(WARNING, "fedssl | site worker: the ClientApp left before the reply to its %s message: %s", kind, err)
        return
    log(INFO, "fedssl | site worker: %s message of run %d answered in %.1fs", kind, context.run_id,
        time.perf_counter() - started)


class WindowCache:
    """`load_site` that keeps the windows it loaded last in memory, keyed by what they are built
    from (the site's and the data's configuration, the data folder and the seed). A worker serves
    one site, so one entry is kept; records changed on disk while it runs are read after a restart."""

    def __init__(self, load: Callable[..., WindowSet]) -> None:
        self.load = load
        self.key: tuple | None = None
        self.windows: WindowSet | None = None

    def __call__(self, site, data, workdir, seed) -> WindowSet:
        key = (site, data, Path(workdir), seed)
        if key != self.key:
            self.windows, self.key = self.load(site, data, workdir, seed), key
        return self.windows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", type=Path, required=True,
                        help=f"the Unix socket to serve (the SuperNode's node config {SOCKET_KEY})")
    parser.add_argument("--site-file", type=Path, help="the site's site.yaml: checked before serving")
    args = parser.parse_args(argv)
    from fedssl.config import ConfigError
    from fedssl.sitefile import load_site_file

    try:
        site = load_site_file(args.site_file).site if args.site_file else None
        serve(args.socket, site)
    except (ConfigError, WorkerError) as err:
        sys.exit(f"fedssl worker: {err}")


if __name__ == "__main__":
    main()
