"""The site's warm worker: one long-lived process that runs its node's ClientApp for every message.

In its default isolation (`subprocess`) Flower's SuperNode (1.41, 1.42) starts a new `flwr-clientapp`
process for every message, which pays Python's start-up, Flower's and torch's imports, the app's
installation and the site's set-up again every round (docs/performance.md, round overhead).
Started with `--isolation process`, the SuperNode instead leaves its tasks to a process of the
site's choosing, which asks the SuperNode's Runtime API for them as Flower's SuperExec does. The
worker is that process: it takes each ClientApp task, runs fedssl's ClientApp (client/app.py) in
its own process, where Flower, torch and the site's windows stay loaded, and pushes the reply and
the task's outcome back, as `flwr-clientapp` would.

    python -m client.worker --runtime-api-address 127.0.0.1:9094
        [--superexec-auth-secret-file SECRET] [--site-file site.yaml]

Each task runs in a thread of its own, the ClientApp itself one at a time: a task that cannot
be handed over (its message's objects never reach the SuperNode, e.g. a stale message of a run
that stopped while the coordinator restarted) waits in its thread, as it would in its own
`flwr-clientapp` process, without holding up the next one. It serves until SIGTERM. With the SuperNode's `--superexec-auth-secret-file`,
only a process holding the same secret (the worker) can take the node's tasks. The code that
answers is the fedssl installed beside the worker, not the app the coordinator sent: a run of any
other app is answered with an Error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path

import httpx
from flwr.app import Error, Message
from flwr.common import log
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

APP_ID = "fedssl/fedssl"  # the publisher/name of pyproject.toml's [tool.flwr.app]: the only app answered
# how often an idle worker asks its SuperNode for a task: each ask costs ~3 ms of CPU (worker and
# SuperNode together), so 4 a second keep an idle node at ~1 % of a core, for 0.125 s of mean delay
TASK_POLL_SECONDS = 0.25
AUTHENTICATED_METHODS = ("/flwr.proto.Runtime/AcquireTask",)  # what the SuperExec secret signs


def serve(runtime_api_address: str, secret: bytes | None = None, site: str | None = None) -> None:
    """Run the ClientApp tasks of the SuperNode at `runtime_api_address` until SIGTERM; `site`
    names the site in the log."""
    signal.signal(signal.SIGTERM, stop)
    importlib.import_module("client.site_round")  # torch, opacus and the site's code: once, before the first task
    from client.app import app
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=AUTHENTICATED_METHODS))
    tasks = runtime_client(runtime_api_address, interceptors)
    log(INFO, "fedssl | site worker%s ready for the SuperNode at %s (pid %d)", f" of {site}" if site else "",
        runtime_api_address, os.getpid())
    one_app_at_a_time = threading.Lock()
    try:
        while True:
            acquired = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if acquired.HasField("task") and acquired.token:
                threading.Thread(target=run_task, args=(runtime_api_address, acquired.token, app, one_app_at_a_time),
                                 name=f"task {acquired.task.task_id}", daemon=True).start()
            time.sleep(TASK_POLL_SECONDS)
    finally:
        tasks.close()
        log(INFO, "fedssl | site worker stopped")


def stop(signum: int, frame) -> None:
    """SIGTERM: leave the serving loop, even mid-task (its outcome is still pushed, as failed)."""
    raise SystemExit(0)


def runtime_client(address: str, interceptors: list) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API that retries as Flower's own processes do, except that
    a refused secret is an error to report (Flower's processes interrupt themselves on it)."""
    retry = make_simple_http_retry_invoker()
    retry_unless_denied = retry.should_giveup
    retry.should_giveup = lambda err: is_unauthorized(err) or retry_unless_denied(err)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=retry)


def is_unauthorized(err: Exception) -> bool:
    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code == httpx.codes.UNAUTHORIZED


def run_task(runtime_api_address: str, token: str, app: Callable[..., Message], one_app_at_a_time: threading.Lock) -> None:
    """One ClientApp task, as `flwr-clientapp` runs it: pull the message and its context, answer it
    with `app` (holding `one_app_at_a_time`), push the reply, then the task's outcome (the SuperNode
    waits for both). A failure to pull or push is logged: the SuperNode then fails the task."""
    started = time.perf_counter()
    client = runtime_client(runtime_api_address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                                  RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))  # a long round is not a dead task
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "stopped before the ClientApp answered"
    try:
        message, context, run, _ = pull_task_input(client)
        log(INFO, "fedssl | site worker: %s message of run %d taken", message.metadata.message_type, context.run_id)
        if run.fab_id != APP_ID:
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                                  reason=f"this node runs {APP_ID} only, not {run.fab_id}"), reply_to=message)
            details = reply.error.reason
        else:
            try:
                with one_app_at_a_time:
                    reply = app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as err:  # noqa: BLE001 - the site's own failures are Error replies already; this is a bug
                log(ERROR, "fedssl | site worker: the ClientApp raised on a %s message", message.metadata.message_type,
                    exc_info=err)
                details = f"the ClientApp raised {type(err).__name__} (details in the site's log)"  # nothing of the data
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        push_message(client, reply, context)
        log(INFO, "fedssl | site worker: %s message of run %d answered in %.1fs", message.metadata.message_type,
            context.run_id, time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 - a task the SuperNode could not hand over or take back
        log(ERROR, "fedssl | site worker: a task failed: %s: %s", type(err).__name__, err)
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the Runtime API of the site's SuperNode (its --host:--port)")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="the secret file the SuperNode was given (--superexec-auth-secret-file)")
    parser.add_argument("--site-file", type=Path, help="the site's site.yaml: checked before serving")
    args = parser.parse_args(argv)
    from fedssl.config import ConfigError
    from fedssl.sitefile import load_site_file

    try:
        site = load_site_file(args.site_file).site if args.site_file else None
        secret = load_superexec_auth_secret(str(args.superexec_auth_secret_file)
                                            if args.superexec_auth_secret_file else None)
    except (ConfigError, ValueError) as err:
        sys.exit(f"fedssl worker: {err}")
    try:
        serve(args.runtime_api_address, secret, site)
    except httpx.HTTPStatusError as err:
        if not is_unauthorized(err):
            raise
        sys.exit(f"fedssl worker: the SuperNode at {args.runtime_api_address} refused the worker's secret: give both "
                 "the same --superexec-auth-secret-file")


if __name__ == "__main__":
    main()
