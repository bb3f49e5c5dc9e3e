"""A ``python`` for the commands the tests run that starts in a second instead of ~6 CPU-seconds.

One server per test process (``support.warm_server``) has already imported torch, Lightning, Hydra,
timm and vitlab (``serve``). For each command the server forks a monitor, the monitor forks the
command's process, and the command runs there from its imports on (``support.run_as_python``: the
script as ``__main__``, ``-m`` a module, ``-c`` code) with its own arguments, working directory,
environment, stdin, stdout and stderr (passed over the socket), exit code and signals. The monitor
reports the command's PID, then its exit status; it kills the command if its requester goes away
(as a command dies with a killed ``python``).

Two kinds of requester:
- ``support.Command`` (``run_script`` / ``start_script``): the tests' own commands.
- the client (``write_client``): a ``python`` first on ``PATH`` (the README's commands, run in bash
  as written) and the commands' ``sys.executable``, so what they start with it (Lightning's DDP
  processes, submitit's jobs) starts warm too. It forwards signals to the command
  and exits with its exit code. Anything it cannot hand over (interpreter options other than ``-u``,
  no server, submitit's local job controller: it names its job after its own PID) runs the real
  interpreter instead; ``multiprocessing``'s spawn runs the real one too
  (its children inherit pipes the server cannot be handed).

The install tests and ``make train`` start real interpreters. A server whose test process died
without stopping it (killed: no exit functions ran) ends itself within a second.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLIENT = '''#!{python} -SE
# vitlab tests: hands `python ARGS` to the warm server at {socket!r} (tests/warm_python.py)
import json, os, signal, socket, sys
args = sys.argv[1:]
unbuffered = args[:1] == ["-u"]
args = args[unbuffered:]
sock = socket.socket(socket.AF_UNIX)
try:
    if not args or (args[0].startswith("-") and args[0] not in ("-m", "-c")):
        raise OSError("an interpreter option the server does not take")
    if args[:2] == ["-m", "submitit.local._local"]:  # its job folder is named after its own PID
        raise OSError("a process whose PID must be the one its parent started")
    sock.connect({socket!r})
except OSError:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
request = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "unbuffered": unbuffered,
                      "executable": os.path.abspath(sys.argv[0])}}).encode()
socket.send_fds(sock, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
replies = sock.makefile("rb")
pid = int(replies.readline())
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda number, frame: os.kill(pid, number))
status = int(replies.readline())
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
'''


def write_client(bin_dir: Path, socket_path: Path) -> Path:
    """``bin_dir/python``: the client of the server at ``socket_path``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    client = bin_dir / "python"
    client.write_text(CLIENT.format(python=sys.executable, socket=str(socket_path)))
    client.chmod(0o755)
    return client


def start_server(socket_path: Path, log: Path) -> subprocess.Popen:
    """The server, in a process of its own; returns once it listens."""
    server = subprocess.Popen([sys.executable, __file__, "serve", str(socket_path)], stdin=subprocess.DEVNULL,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not socket_path.exists():
        if server.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the warm python server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return server


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """What the client sends: the request (argv, cwd, env, executable, unbuffered) and the command's fds 0, 1, 2."""
    body = json.dumps(request).encode()
    socket.send_fds(sock, [len(body).to_bytes(8, "big") + body], fds)


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = int.from_bytes(data[:8], "big")
    body = data[8:]
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), fds


def _monitor(conn: socket.socket) -> None:
    """In a forked monitor: fork the command, tell the requester its PID, then its exit status; kill
    the command if the requester goes away first (it sends nothing more: readable means closed)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it (no zombies); waitpid needs it back
    request, fds = _receive_request(conn)
    pid = os.fork()
    if pid == 0:
        from support import run_as_python

        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        run_as_python(request["argv"], request["cwd"], request["env"], executable=request.get("executable"),
                      unbuffered=request.get("unbuffered", False))  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    ended = os.pidfd_open(pid)
    if ended not in select.select([ended, conn], [], [])[0]:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall(f"{status}\n".encode())
    except OSError:  # the requester is gone
        pass


def serve(socket_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import support

    for name in support.PRELOAD:
        __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(socket_path + ".tmp")
    listener.listen(64)
    listener.settimeout(1.0)
    os.rename(socket_path + ".tmp", socket_path)  # requesters see the socket only once it listens
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process that started it ended without stopping it
                shutil.rmtree(Path(socket_path).parent, ignore_errors=True)
                return
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            listener.close()
            try:
                _monitor(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2])
