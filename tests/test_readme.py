"""Every command in README.md runs as written, from a temporary working directory.

Code-block commands run for real, in README order, in one directory (later commands read what
earlier ones wrote, as a reader's would), by bash; the ``python`` they find is a warm interpreter
(``tests/warm_python.py``: the command runs in a process of its own forked from one that has
already imported torch and vitlab, ~6 CPU-seconds less per command). Only what makes them fast or
possible here is added:
``debug=smoke data.synthetic=true`` for training (``debug=smoke`` alone where a command trains on a
packed directory: the tiny generated dataset an earlier pack command packed), smaller models where a
command trains a large one 15 times (one block per stage, half the width) or a Mask R-CNN (one block
per stage, narrow heads), CPU instead of GPUs,
SLURM's launcher swapped for submitit's local executor (the same code path without a cluster), small
inputs for the benchmark, and for the ``s3://`` commands a bucket on moto's S3 server on this machine
(``AWS_ENDPOINT_URL``; ``aws s3 sync`` done by boto3's upload, there is no AWS CLI here).
The smoke overrides change a run's directory name (its hash), so a later command's path to an
earlier run is pointed at the directory that run really made. The paper tables' commands are
expanded and composed without training (``vitlab.tools.plan``, in this process, with the same overrides).

A README command no rule below knows fails the test: add the command's rule here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, local_s3, warm_server

README = (REPO / "README.md").read_text()
SMOKE = ["debug=smoke", "data.synthetic=true"]


def code_block_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def table_commands() -> list[str]:
    return re.findall(r"\| `(python src/train\.py [^`]*)`[^|`]*\|", README)


def fast(command: str) -> str | None:
    """The command with what makes it fast here; None where the test suite itself is the command."""
    if command in ("make test",):
        return None  # the suite running this test
    if command == "make train":
        # make runs in the repository: its outputs and data go to this directory, as the others'
        return 'VITLAB_OUTPUT=$PWD/outputs VITLAB_DATA=$PWD/data make -C {repo} train ARGS="debug=smoke"'
    if command.startswith(("python src/train.py", "vitlab-train")):
        extra = list(SMOKE)
        if "data.format=litdata" in command and "data.root=" in command:
            extra = ["debug=smoke"]  # the packed directory an earlier pack command wrote, not generated data
        if "trainer=gpu" in command or "trainer=ddp" in command:
            extra += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                      "trainer.sync_batchnorm=false"]
        if "logger=wandb" in command:
            extra += ["logger.wandb.mode=offline"]
        if "hparams_search=" in command:
            extra += ["hydra.sweeper.n_trials=2"]
        # SLURM -> submitit's local executor, one node: the same launcher code without a cluster
        command = command.replace("hydra/launcher=submitit_slurm", "hydra/launcher=submitit_local")
        command = re.sub(r"trainer\.num_nodes=\d+", "trainer.num_nodes=1", command)
        if "+sweep=pale" in command:  # 15 jobs: Pale-T with one block per stage, half its width
            extra += ["backbone.depths=[1,1,1,1]", "backbone.embed_dims=[32,64,128,256]"]
        if "task=coco_maskrcnn" in command:  # PVTv2-B2's Mask R-CNN: 17 s -> 5 s (narrow FPN, fewer sampled RoIs)
            extra += ["backbone.depths=[1,1,1,1]", "module.head.fpn_channels=16", "module.head.box_batch_size_per_image=32"]
        return f"{command} {' '.join(extra)}"
    if command.startswith("python -m vitlab.tools.bench --pack"):  # 6 small images (and 4: the start-up), one count
        return re.sub(r"--images \d+", "--images 6", command) + " --image-size 64 48 --workers 1"
    if command.startswith("python -m vitlab.tools.bench --eval"):
        return re.sub(r"--images \d+", "--images 2", command)
    if command.startswith("python -m vitlab.data.pack imagenet"):  # a tiny folder layout to pack, if none yet
        make = ("from vitlab.data.synthetic import make_imagenet; import pathlib; "
                "pathlib.Path('data/imagenet/train').exists() or "
                "make_imagenet('data/imagenet', num_classes=2, num_train=2, num_val=1, size=32)")
        return f'python -c "{make}" && {command} --shard-size 64KB --workers 1'
    if command.startswith(("python -m vitlab.data.pack coco", "python -m vitlab.data.pack ade20k")):
        kind = command.split()[3]  # the tiny generated dataset in its layout, if none yet
        make = {"coco": "make_coco('data/coco', num_train=3, num_val=2, size=48)",
                "ade20k": "make_ade20k('data/ade20k', num_train=3, num_val=2, size=48)"}[kind]
        make = (f"from vitlab.data.synthetic_dense import make_{kind}; import pathlib; "
                f"pathlib.Path('data/{kind}').exists() or {make}")
        return f'python -c "{make}" && {command} --shard-size 64KB --workers 1'
    if command.startswith("python -m vitlab.tools.bench --loader") and "--format" in command:
        command = re.sub(r"--(images|dataset-images) \d+", "", command)
        command = command.replace("--device cuda", "--device cpu")  # the tests have no GPU (the model's figure says so)
        model = " --input 32 32 --batch 1 --steps 1 --warmup 0 --rounds 1" if "--model" in command else ""
        return f"{command} --images 4 --dataset-images 8 --workers 0 --image-size 64 48{model}"
    if command.startswith("python -m vitlab.tools.bench --suite"):
        return command  # without a GPU the suite runs its own tiny version
    if command.startswith("python -m vitlab.tools.bench --loader"):
        return f"{command} --images 4 --rounds 1 --image-size 64 48"
    if command.startswith("python -m vitlab.tools.bench"):
        if "--task maskrcnn" in command:  # narrow heads, as for the Mask R-CNN training command
            command += " --override module.head.fpn_channels=16 --override module.head.box_batch_size_per_image=32"
        return f"{command} --batch 1 --input 32 32 --steps 1 --warmup 0 --rounds 1"
    if command.startswith("aws s3 sync "):  # no AWS CLI here: boto3's upload of the same files, to moto's server
        _, _, _, src, url = command.split()
        bucket, prefix = url.removeprefix("s3://").split("/", 1)
        upload = (f"import boto3, pathlib; s3 = boto3.client('s3'); s3.create_bucket(Bucket='{bucket}'); "
                  f"[s3.upload_file(str(p), '{bucket}', '{prefix}/' + str(p.relative_to('{src}'))) "
                  f"for p in pathlib.Path('{src}').rglob('*') if p.is_file()]")
        return f'python -c "{upload}"'
    if command.startswith("python -m vitlab.tools.check_data"):
        return f"{command} data.synthetic=true"
    if command.startswith(("python src/eval.py", "python src/predict.py", "python -m vitlab.")):
        return command
    raise AssertionError(f"README command without a rule in tests/test_readme.py: {command}")


def point_at_real_runs(command: str, cwd: Path) -> str:
    """``outputs/<task>/<backbone>/<name>/...`` of an earlier README command -> the directory it made
    (its name carries the smoke overrides' hash)."""

    def real(match: re.Match) -> str:
        path = Path(match.group(1))
        if (cwd / path).exists():
            return str(path)
        made = sorted((cwd / path.parent).glob(f"{path.name}-*")) if (cwd / path.parent).is_dir() else []
        return str(made[0].relative_to(cwd)) if made else str(path)

    return re.sub(r"(outputs/[\w-]+/[\w-]+/[\w-]+)(?=/|\s|$)", real, command)


@pytest.fixture(scope="module")
def warm_python():
    """The directory of the warm ``python`` (``support.warm_server``), first on the commands' PATH."""
    return warm_server()[1].parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A reader's directory: the commands say src/train.py, photos/ holds their own images and
    official/ the authors' model file."""
    from PIL import Image

    cwd = tmp_path_factory.mktemp("reader")
    (cwd / "src").symlink_to(REPO / "src")
    (cwd / "photos").mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (96, 72), colour).save(cwd / "photos" / f"photo_{i}.jpg")
    # official/: where the reader copies the authors' model file; timm's PVTv2 stands in for it here
    (cwd / "official").mkdir()
    (cwd / "official" / "pvt_v2.py").write_text(
        "import timm\n\n\ndef pvt_v2_b2(**kwargs):\n    return timm.create_model('pvt_v2_b2', **kwargs)\n")
    return cwd


def run(command: str, cwd: Path, python_dir: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Outputs and generated data under the temporary directory (the README's relative paths);
    ``python`` from ``python_dir``, the installed commands from the environment's bin/."""
    env = {**os.environ, **(env or {}), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "VITLAB_OFFLINE": "1",
           "PATH": f"{python_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for key in ("VITLAB_OUTPUT", "VITLAB_DATA", "VITLAB_SWEEP_DIR", "PROJECT_ROOT"):
        env.pop(key, None)
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def s3_endpoint():
    """The environment of a bucket for the ``s3://`` commands: moto's S3 server on this machine,
    reached as MinIO would be (AWS_ENDPOINT_URL)."""
    pytest.importorskip("moto")
    with local_s3() as env:
        yield env


COMMANDS = code_block_commands()


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c[:60] for c in COMMANDS])
def test_readme_command_runs(index, workdir, warm_python, s3_endpoint):
    command = fast(COMMANDS[index])
    if command is None:
        pytest.skip("make test is the command running this test")
    command = command.format(repo=shlex.quote(str(REPO)))
    # the s3:// commands' bucket; the local copy of a bucket's pack under this directory, not ~/.cache
    env = {**s3_endpoint, "XDG_CACHE_HOME": str(workdir / "cache")}
    run(point_at_real_runs(command, workdir), workdir, warm_python, env=env)


TABLE_COMMANDS = table_commands()


def test_readme_has_the_paper_table_commands():
    assert len(TABLE_COMMANDS) > 30, "the paper tables' commands were not found"


@pytest.mark.parametrize("command", TABLE_COMMANDS, ids=[c.removeprefix("python src/train.py ")[:60] for c in TABLE_COMMANDS])
def test_readme_paper_table_command_composes(command):
    """Every 'Reproducing the papers' command expands and composes without launching anything
    (``vitlab.tools.plan.expand``: every job's config, composed as ``python src/train.py -m`` composes
    it), and each job's model builds (on the meta device, as the zoo builds it). The models' params
    and GFLOPs against the papers are tests/test_zoo.py's."""
    from vitlab.runtime.flops import count_params
    from vitlab.tools import plan, zoo

    overrides = command.removeprefix("python src/train.py").replace(" -m ", " ").split()
    jobs = plan.expand(overrides)
    assert jobs, command
    for name, sets, task in {(j.backbone, tuple(j.backbone_overrides), j.task) for j in jobs}:
        model = zoo.build_for_count(name, list(sets), None if task == "imagenet_cls" else task, "classifier")
        assert count_params(model) > 0, (command, name, sets, task)


WARM_CASES = [
    'python -c "import sys, os; print(sys.argv, os.getcwd(), os.environ[\'PROBE\']); sys.exit(3)" a "b c"',
    'python -u -c "import sys; print(1); sys.stderr.write(\'2\\\\n\'); print(3)" 2>&1',
    'python -c "import sys; sys.stderr.write(sys.stdin.read().upper())" <<< hello',
    'python -c "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"',
    'printf "import sys\\nprint(sys.path[0], __name__, sys.argv)\\n" > probe.py && python probe.py x',
    'python -m json.tool <<< \'{"a": 1}\'',
    # what a command starts with sys.executable (DDP's processes, submitit's jobs)
    'python -c "import subprocess, sys; sys.exit(subprocess.call([sys.executable, \'-c\', \'import sys; print(sys.argv); sys.exit(4)\', \'x\']))"',
]


@pytest.mark.parametrize("command", WARM_CASES)
def test_warm_python_behaves_as_the_interpreter(command, warm_python, tmp_path):
    """What the README's commands see through the warm ``python`` equals what the real interpreter
    gives them: output, stderr, exit code (a signal's too), argv, working directory, environment,
    stdin, a script's sys.path[0] and ``__main__``, ``-u``'s unbuffered output, and what a command
    starts with ``sys.executable``."""
    def run_with(python_dir):
        env = {**os.environ, "PROBE": "seen", "PATH": f"{python_dir}:{os.environ['PATH']}"}
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)

    real, warm = run_with(Path(sys.executable).parent), run_with(warm_python)
    assert (warm.returncode, warm.stdout, warm.stderr) == (real.returncode, real.stdout, real.stderr)


def test_every_readme_command_has_a_rule():
    for command in COMMANDS:
        fast(command)  # raises for a command the test does not know how to run
    assert any(c.startswith("python src/eval.py") for c in COMMANDS)
