"""Helpers shared by the tests (not a test file): the repository, tiny model overrides, running
the command-line entry points as a user does (in a process of their own, ``run_script`` / ``start_script``)."""
from __future__ import annotations

import builtins
import contextlib
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

from torch import nn

REPO = Path(__file__).resolve().parents[1]

# A PVTv2-B0 shrunk to one block per stage: fast, and still the real family code.
TINY_PVT = [
    "backbone=pvt_v2_b0",
    "backbone.depths=[1,1,1,1]",
    "backbone.embed_dims=[16,32,48,64]",
    "backbone.num_heads=[1,1,2,2]",
    "backbone.drop_path_rate=0.0",
]
# The shared smoke sweep (conftest.py ``smoke_sweep``): a backbone field with two values, times two seeds.
SWEEP_RATIOS = ["[4,4,4,4]", "[2,2,2,2]"]
SWEEP_SEEDS = [0, 1]
# The demo on 32 px images, no workers, no progress bar: a real training run in seconds.
FAST = [*TINY_PVT, "experiment=demo", "data.num_workers=0", "data.img_size=32", "data.batch_size=16",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]
# The shared dense smoke runs (conftest ``detection_run``, ``segmentation_run``): narrow heads (Mask R-CNN:
# also fewer sampled RoIs, proposals and detections, for its 256-channel mask head), 4 generated training
# images and 9 validation images (an odd count, for the DDP evaluation test).
_DENSE_DATA = ["debug=smoke", "data.synthetic=true", "data.synthetic_num_train=4", "data.synthetic_num_val=9",
               "data.smoke_images=9", "logger=csv"]
DENSE_SMOKE = {
    "coco_maskrcnn": [*_DENSE_DATA, "module.head.fpn_channels=16", "module.head.box_batch_size_per_image=32",
                      "module.head.rpn_post_nms_top_n_test=100", "module.head.box_detections_per_img=20"],
    "ade20k_fpn": [*_DENSE_DATA, "module.head.fpn_channels=16", "module.head.channels=16"],
}


# ----------------------------------------------------------------------------- commands as a user runs them
# A command runs in a process of its own, as a user's does, forked from a server that has already
# imported torch, Lightning, Hydra, timm and vitlab (tests/warm_python.py; one per test process). A
# fresh interpreter spends ~5 CPU-seconds importing those before the command starts; the command
# starts from that state instead of paying it once per command. Everything after the imports is the
# user's: the script is run as ``__main__`` with its command line in ``sys.argv``, in its own working
# directory and environment, its own signal handlers, exit code and output; whatever it changes in its
# process ends with it (the tests' process is never touched). Only what a fresh interpreter does at
# start is redone by hand: ``PYTHONPATH`` entries (and a ``sitecustomize.py`` in one), what modules
# read from the environment at import (Lightning's rank, torch's threads), ``PYTHONWARNINGS=ignore``,
# ``-u``, and ``sys.executable`` (the warm ``python``, so the processes a command starts with it, such
# as DDP's and submitit's, start warm too). The README's commands find the same ``python`` first on
# their PATH; the install tests and ``make train`` start real interpreters.
PRELOAD = ["vitlab.runtime.cli", "vitlab.tools.predict", "vitlab.backbones", "vitlab.tasks", "vitlab.data",
           "torchvision.models.detection", "lightning.pytorch.loggers"]
_server: dict = {}


def warm_server() -> tuple[Path, Path]:
    """(socket, client) of this process's warm python server, started on first use and stopped at exit."""
    if not _server:
        import atexit

        from warm_python import start_server, write_client

        folder = Path(tempfile.mkdtemp(prefix="warm-python-"))  # short: a socket's path has at most 107 bytes
        process = start_server(folder / "socket", folder / "server.log")
        _server.update(socket=folder / "socket", client=write_client(folder / "bin", folder / "socket"))

        def stop():
            process.kill()
            process.wait()
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(stop)
    return _server["socket"], _server["client"]


def _leave_the_server_behind() -> None:
    """What a fresh interpreter would not share with its siblings: the server's exit functions and
    finalizers stay the server's (W&B's media folder, made at import, is deleted by one; run in every
    child it would vanish under the others), and the random generators are seeded anew."""
    import atexit
    import random
    import weakref

    import numpy as np

    atexit._clear()
    for finalizer in list(weakref.finalize._registry):
        finalizer.detach()
    weakref.finalize._registered_with_atexit = False  # the child's own finalizers run at its exit
    random.seed()
    np.random.seed()


def _read_the_environment_again(env: dict) -> None:
    """What the preloaded modules read from the environment at import, read from the command's:
    Lightning's process rank (a DDP process started with ``LOCAL_RANK=1``) and torch's thread count."""
    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and int(threads) != torch.get_num_threads():
        torch.set_num_threads(int(threads))


def run_as_python(argv: list[str], cwd: str, env: dict, executable: str | None = None,
                  unbuffered: bool = False) -> None:
    """In a freshly forked child: what ``python argv...`` does from its imports on (``argv[0]``: a
    script, ``-m`` and a module, or ``-c`` and code), then the process ends with its exit code.
    ``executable``: the ``python`` it was started as (``sys.executable``); ``unbuffered``: ``-u``."""
    _leave_the_server_behind()
    import atexit
    import io
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _read_the_environment_again(env)
    if executable:
        sys.executable = executable
    if unbuffered:  # python -u: unbuffered binary stdout and stderr
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True,
                                      errors="backslashreplace")
    multiprocessing.process.ORIGINAL_DIR = os.path.abspath(cwd)  # what spawn resolves relative paths against
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    for entry in reversed([e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]):
        sys.path.insert(0, entry)
        if (Path(entry) / "sitecustomize.py").is_file():
            runpy.run_path(str(Path(entry) / "sitecustomize.py"), run_name="sitecustomize")
    # a fresh __main__, as the interpreter's (multiprocessing's spawn looks it up as __mp_main__ too)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)  # as python -m puts the working directory first
            runpy._run_module_as_main(argv[1])  # what python -m runs
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as python script.py puts its folder first
            main.__file__ = argv[0]
            exec(compile(Path(argv[0]).read_bytes(), argv[0], "exec"), main.__dict__)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit (the command's own: W&B's, finalizers)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Command:
    """A command started by the warm python server (see above), with the part of
    ``subprocess.Popen``'s interface the tests use. Output goes to ``log`` (stdout and stderr
    together) or to files read back by ``communicate``; stdin is empty."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, log: Path | None = None):
        from warm_python import send_request

        self.args = argv
        if log is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="command-"))
            self._out, self._err = self._tmp / "stdout", self._tmp / "stderr"
        else:
            self._tmp, self._out, self._err = None, Path(log), None
        self._out.touch()
        socket_path, client = warm_server()
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.connect(str(socket_path))
        with open(os.devnull, "rb") as stdin, open(self._out, "ab") as out, open(self._err or self._out, "ab") as err:
            send_request(self._sock, {"argv": argv, "cwd": str(cwd), "env": env, "executable": str(client)},
                         [stdin.fileno(), out.fileno(), err.fileno()])
        self._replies = b""
        self.pid = int(self._reply(None))
        self.returncode: int | None = None

    def _reply(self, timeout: float | None) -> bytes | None:
        """The monitor's next line (the PID, then the exit status), or None if none came within ``timeout``."""
        while b"\n" not in self._replies:
            if not select.select([self._sock], [], [], timeout)[0]:
                return None
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"the warm python's monitor of {self.args} ended without its exit status")
            self._replies += chunk
        line, _, self._replies = self._replies.partition(b"\n")
        return line

    def _settle(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            status = self._reply(timeout)
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(int(status))
                self._sock.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._settle(0)

    def wait(self, timeout: float | None = None) -> int:
        if self._settle(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> str:
        """Everything written so far (stdout, then stderr)."""
        text = self._out.read_text(errors="replace")
        return text + (self._err.read_text(errors="replace") if self._err and self._err.exists() else "")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        out = self._out.read_text(errors="replace")
        err = self._err.read_text(errors="replace") if self._err else ""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return out, err


def command_env(data_dir: Path | None, env: dict | None = None) -> dict:
    base = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"}
    if data_dir is not None:
        base["VITLAB_DATA"] = str(data_dir)
    for key in ("PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        base.pop(key, None)
    return {**base, **(env or {})}


def start_script(script: str, args: list[str], data_dir: Path | None, env: dict | None = None,
                 cwd: Path | None = None, log: Path | None = None) -> Command:
    """``python src/<script> args...`` started (``script`` ``-m``: ``python -m args[0] args[1:]``)."""
    argv = ["-m", *args] if script == "-m" else [str(REPO / "src" / script), *args]
    return Command(argv, cwd or REPO, command_env(data_dir, env), log)


def run_script(script: str, args: list[str], data_dir: Path | None, env: dict | None = None, check: bool = True,
               timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python src/<script> args...`` to its end, generated data under ``data_dir``; a failure
    (``check``) raises with the command's output."""
    command = start_script(script, args, data_dir, env, cwd)
    out, err = command.communicate(timeout=timeout)
    proc = subprocess.CompletedProcess(command.args, command.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return proc


_CALL = """import pickle, sys
sys.path.insert(0, {tests!r})
fn, args = pickle.loads(open({call!r}, "rb").read())
try:
    payload = (True, fn(*args))
except BaseException:
    import traceback
    payload = (False, traceback.format_exc())
open({result!r}, "wb").write(pickle.dumps(payload))
"""


def call_in_child(fn, *args):
    """``fn(*args)`` in a process of its own (a command ``python -c``), in this process's environment and
    working directory (``fn``: a module-level function of a test module); its return value is sent
    back, its exception raised here with the child's traceback."""
    return call_in_children(fn, [args])[0]


def call_in_children(fn, arg_lists: list) -> list:
    """``fn(*args)`` for each ``args`` of ``arg_lists``, each in a process of its own (see
    ``call_in_child``), all running at once (the ranks of a process group); their return values in order."""
    import pickle

    tmp = Path(tempfile.mkdtemp(prefix="call-"))
    try:
        commands = []
        for k, args in enumerate(arg_lists):
            (tmp / f"call{k}").write_bytes(pickle.dumps((fn, tuple(args))))
            code = _CALL.format(tests=str(Path(__file__).parent), call=str(tmp / f"call{k}"),
                                result=str(tmp / f"result{k}"))
            commands.append(Command(["-c", code], Path.cwd(), dict(os.environ), log=tmp / f"log{k}"))
        values = []
        for k, command in enumerate(commands):
            command.wait()
            result = tmp / f"result{k}"
            ok, value = pickle.loads(result.read_bytes()) if result.exists() else (False, None)
            if not ok:
                raise AssertionError(f"{fn.__name__}{tuple(arg_lists[k])!r:.200} failed in the child (exit "
                                     f"{command.returncode}):\n{value}\n{(tmp / f'log{k}').read_text()[-3000:]}")
            values.append(value)
        return values
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StandIn(nn.Module):
    """A backbone following the contract: strided convs, one map per entry of ``strides``."""

    def __init__(self, channels=(8, 16, 24, 32), strides=(4, 8, 16, 32)):
        super().__init__()
        self.out_channels, self.strides = list(channels), list(strides)
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 3, padding=1) for c in channels)

    def forward(self, x):
        return [conv(nn.functional.avg_pool2d(x, s)) for conv, s in zip(self.convs, self.strides)]


# ----------------------------------------------------------------------------- W&B's own record of a run
def wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks
    of [crc32, length, type] chunks around protobuf ``Record``s). Tests only: they check what W&B
    itself recorded (config, summary, history, tables) against what vitlab meant to log, and wandb
    >= 0.19 has no public reader of offline runs (vitlab.tools.dashboard reads summary.json instead)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run_info(path: Path) -> dict:
    """Identity (id, project, entity, group), config, summary keys, numeric history keys and step
    metric of one offline W&B run, from its ``.wandb`` log (``wandb_records``)."""
    import json

    info = {"history": set(), "step_metric": None, "config": {}, "summary": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            info["summary"] |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
        elif kind == "run":
            run = record.run
            info.update(wandb_id=run.run_id, project=run.project or None, entity=run.entity or None,
                        group=run.run_group or None)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    info["history"].add(key)
        elif kind == "metric" and record.metric.step_metric and not info["step_metric"]:
            info["step_metric"] = record.metric.step_metric  # Lightning: trainer/global_step
    return info


# ----------------------------------------------------------------------------- a bucket on this machine
@contextlib.contextmanager
def local_s3(tls_dir: Path | None = None):
    """moto's S3 server on 127.0.0.1 for the ``s3://`` tests; yields the environment that reaches it as
    MinIO would be reached (``AWS_ENDPOINT_URL`` and test credentials), for this process or a command.
    ``tls_dir``: served over HTTPS with a certificate of a private authority written there
    (``AWS_CA_BUNDLE`` names it, as for a store behind a company's own CA)."""
    from moto.server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Server(ThreadedMotoServer):
        def _server_entry(self):  # ThreadedMotoServer's, with a TLS context
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler,
                                       ssl_context=self_signed(tls_dir) if tls_dir else None)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"{'https' if tls_dir else 'http'}://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        yield env | ({"AWS_CA_BUNDLE": str(tls_dir / "cert.pem")} if tls_dir else {})
    finally:
        server.stop()


def self_signed(folder: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key (cert.pem, key.pem in ``folder``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def timm_float_pipeline(dm):
    """timm's DeiT training transform as timm builds it without its prefetcher (float32, normalised
    in the transform; no random erasing), with ``dm``'s options: the independent reference for the
    DataModule's uint8 form + normalisation after the transfer. Apply it to ``pil_rgb(path)``."""
    from timm.data import create_transform

    return create_transform(dm.img_size, is_training=True, scale=dm.scale, hflip=dm.hflip, color_jitter=dm.color_jitter,
                            auto_augment=dm.auto_augment, interpolation=dm.interpolation, re_prob=0.0,
                            use_prefetcher=False)


def pil_rgb(path):
    """An image file as torchvision's ImageFolder loader gives it to a transform."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
