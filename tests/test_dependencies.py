"""The behaviours of the installed libraries that vitlab's code relies on, and the record of the
tested versions. A failure here means a dependency changed under us: each test names the vitlab
code that relies on the behaviour; adapt it, then rerun tools/freeze_constraints.py."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from support import REPO
from vitlab.data.imagenet import posterize
from vitlab.data.synthetic import make_imagenet


def noise_image(size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_constraints_pin_the_whole_stack():
    """constraints.txt (used by `make install`) pins every package vitlab and its extras pull in,
    except what the Makefile's TORCH line installs."""
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("freeze_constraints", REPO / "tools" / "freeze_constraints.py")
    freeze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    unpinned = sorted(set(freeze.constraints()) - set(pins))
    assert not unpinned, f"not in constraints.txt: {unpinned}; rerun tools/freeze_constraints.py"
    assert not {"torch", "torchvision", "vitlab"} & set(pins)
    assert {"pillow", "timm", "pycocotools", "lightning", "hydra-core", "numpy"} <= set(pins)


def test_pillow_posterize():
    """vitlab.data.imagenet.posterize hands 1..8 bits to Pillow (through timm) and answers 0 bits
    itself: Pillow keeps the top bits, and refuses 0 bits (13.0) or gives black (< 13)."""
    img = noise_image()
    for bits in range(1, 9):
        assert (np.asarray(ImageOps.posterize(img, bits)) == np.asarray(img) & (0xFF << (8 - bits) & 0xFF)).all()
    try:
        zero = ImageOps.posterize(img, 0)
    except ValueError:
        return
    assert not np.asarray(zero).any()


def test_timm_builds_its_ops_from_the_table_vitlab_registers_into():
    """timm's AugmentOp takes its function from NAME_TO_OP when built (vitlab.data.imagenet puts
    its posterize there), and RandAugment inc1 at magnitude 10 asks for 0 bits (the recipe's case)."""
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op.aug_fn is posterize
    assert auto_augment.LEVEL_TO_ARG["PosterizeIncreasing"](10, {}) == (0,)
    assert not np.asarray(op(noise_image())).any()


def test_pillow_open_reads_the_header_only(tmp_path):
    """The cheap data check reads sizes with Image.open (vitlab.data.imagenet.read_header) and
    only the full check decodes: a truncated JPEG has its size but no pixels."""
    path = tmp_path / "cut.jpg"
    noise_image(64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        with pytest.raises(OSError):
            img.load()


def test_imagefolder_class_order_and_empty_folders(tmp_path):
    """ImageNetDataModule.info names the sorted class folders, ImageFolder's label order; a class
    folder without images stops ImageFolder unless allow_empty (data.skip_corrupt=true)."""
    root = make_imagenet(tmp_path / "in", num_classes=3, num_train=1, num_val=1, size=8)
    (root / "train" / "n00000000").mkdir()  # sorts first, holds nothing
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(root / "train"))
    folder = ImageFolder(str(root / "train"), allow_empty=True)
    assert folder.classes == sorted(p.name for p in (root / "train").iterdir())
    assert [t for _, t in folder.samples] == [1, 2, 3]


def test_sanitize_drops_squashed_boxes_with_their_labels():
    """The COCO training pipeline (vitlab.data.coco) relies on SanitizeBoundingBoxes(min_size=1)
    to drop boxes a resize squashed below one pixel, with their labels."""
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, 0.5, 10], [2, 2, 9, 9.0]]), format="XYXY",
                                     canvas_size=(16, 16))
    _, target = v2.SanitizeBoundingBoxes(min_size=1)(torch.zeros(3, 16, 16),
                                                     {"boxes": boxes, "labels": torch.tensor([4, 7])})
    assert target["labels"].tolist() == [7] and target["boxes"].tolist() == [[2, 2, 9, 9]]


# ----------------------------------------------------------------------------- declared dependencies
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared() -> dict[str, list]:
    """Section ("core" or an extra's name) -> its requirements (packaging's Requirement)."""
    from packaging.requirements import Requirement

    proj = project()
    sections = {"core": proj["dependencies"], **proj["optional-dependencies"]}
    return {name: [Requirement(line) for line in lines] for name, lines in sections.items()}


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def src_imports() -> list[tuple[str, str, str]]:
    """(importing file, imported top-level module, how: "module" level / "lazy" in a function /
    the extra named by a vitlab.runtime.extras.require call) for every import under src/."""
    import ast

    found = []
    for path in sorted((REPO / "src").rglob("*.py")):
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            how = "lazy" if id(node) in inside else "module"
            if isinstance(node, ast.Import):
                found += [(path.name, a.name.split(".")[0], how) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path.name, node.module.split(".")[0], how))
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                  and all(isinstance(a, ast.Constant) for a in node.args[:2])):
                found.append((path.name, node.args[0].value.split(".")[0], node.args[1].value))
    return found


def test_every_imported_package_is_declared_where_it_is_needed():
    """Imported at module level or lazily: a core dependency. An extra's package: imported only
    through vitlab.runtime.extras.require, naming the extra that declares it (which tells a user the pip line)."""
    import sys
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    sections = {name: {canonical(r.name) for r in reqs} for name, reqs in declared().items()}
    problems, imports = [], src_imports()
    for file, module, how in imports:
        if module in sys.stdlib_module_names or module == "vitlab":
            continue
        dists = {canonical(d) for d in owners.get(module, [])}
        if not dists:
            problems.append(f"{file}: imports {module}, which no installed distribution provides")
        elif how in ("module", "lazy") and not dists & sections["core"]:
            extras = sorted(s for s, names in sections.items() if dists & names)
            problems.append(f"{file}: imports {module} ({how}) but it is not a core dependency"
                            + (f"; use vitlab.runtime.extras.require(..., {extras[0]!r}, ...)" if extras else ""))
        elif how not in ("module", "lazy") and not dists & sections.get(how, set()):
            problems.append(f"{file}: require({module!r}, {how!r}): extra {how!r} does not declare it")
    assert not problems, "\n".join(problems)
    assert {"numpy", "yaml", "filelock"} <= {m for _, m, _ in imports}  # the scan sees them


def test_a_missing_extra_names_its_pip_line(monkeypatch):
    """Code that needs wandb (an extra since the default logger is CSV) says how to install it."""
    import sys

    from vitlab.tools import compare
    from vitlab.runtime.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(MissingExtraError, match=r"needs the 'wandb' package.*pip install 'vitlab\[wandb\]'"):
        compare.load_wandb_runs("me/vitlab")


def test_core_install_leaves_the_old_search_stack_and_wandb_out():
    """The SLURM launcher comes without Optuna 2 / SQLAlchemy 1; wandb is not core."""
    sections = {name: {canonical(r.name) for r in reqs} for name, reqs in declared().items()}
    assert not {"wandb", "wandb-workspaces", "hydra-optuna-sweeper", "sqlalchemy", "alembic",
                "hydra-submitit-launcher"} & sections["core"]
    assert sections["slurm"] == {"hydra-submitit-launcher"}
    assert {"hydra-optuna-sweeper", "sqlalchemy", "alembic"} <= sections["search"]
    makefile = (REPO / "Makefile").read_text()
    extras = set(re.search(r"^EXTRAS := (\S+)", makefile, re.M).group(1).split(","))
    assert extras == set(project()["optional-dependencies"]), "make install must install every extra the tests use"


# (distribution, first release with it, what vitlab uses, where (a pattern in src/), check on the installed one).
# The releases were read from the libraries' own wheels / changelogs (lightning CHANGELOG 2.6.0: "Expose
# weights_only argument for Trainer.{fit,validate,test,predict}"; torchvision 0.19 / 0.20 / 0.21 wheels).
def _fit_takes_weights_only():
    import lightning as L
    return "weights_only" in inspect.signature(L.Trainer.fit).parameters


def _v2_public_transform_hooks():
    return callable(getattr(v2.Transform, "make_params", None)) and callable(getattr(v2.Transform, "transform", None))


FLOORS = [
    ("lightning", "2.6", "Trainer.fit(weights_only=True)", r"\.fit\([^)]*weights_only=", _fit_takes_weights_only),
    ("torchvision", "0.21", "v2.Transform subclasses with make_params / transform", r"def make_params",
     _v2_public_transform_hooks),
    ("torchvision", "0.20", "v2.query_size", r"v2\.query_size", lambda: hasattr(v2, "query_size")),
    ("torchvision", "0.18", "ImageFolder(allow_empty=)", r"allow_empty=",
     lambda: "allow_empty" in inspect.signature(ImageFolder).parameters),
    ("torch", "2.6", "torchvision 0.21 (built for torch 2.6)", r"from torchvision", lambda: True),
    ("timm", "1.0.8", "prune_intermediate_layers, forward_intermediates", r"prune_intermediate_layers\(",
     lambda: hasattr(importlib.import_module("timm.models.swin_transformer").SwinTransformer,
                     "prune_intermediate_layers")),
    ("timm", "1.0.12", "timm.optim.get_optimizer_info (fused optimiser kernels)", r"get_optimizer_info\(",
     lambda: hasattr(importlib.import_module("timm.optim"), "get_optimizer_info")),
    ("pyyaml", "5.1", "yaml.safe_dump(sort_keys=False)", r"safe_dump\([^)]*sort_keys",
     lambda: "sort_keys" in inspect.signature(importlib.import_module("yaml").dump_all).parameters),
    ("pydantic", "2", "TypeAdapter (vitlab.tools.dashboard --dry-run)", r"\.TypeAdapter",
     lambda: hasattr(importlib.import_module("pydantic"), "TypeAdapter")),
]


def lowest_allowed(dist: str):
    from packaging.version import Version

    floors = [Version(s.version) for reqs in declared().values() for r in reqs if canonical(r.name) == dist
              for s in r.specifier if s.operator in (">=", "==", "~=", ">")]
    return min(floors) if floors else None


@pytest.mark.parametrize("dist, first, api, pattern, works", FLOORS, ids=[f"{r[0]}-{r[2][:30]}" for r in FLOORS])
def test_declared_floor_covers_the_api_used(dist, first, api, pattern, works):
    """pyproject's lower bound is no older than the first release with an API vitlab uses."""
    from packaging.version import Version

    sources = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    assert re.search(pattern, sources), f"vitlab no longer uses {api}: drop its row"
    assert works(), f"the installed {dist} lacks {api}"
    floor = lowest_allowed(dist)
    assert floor is not None and floor >= Version(first), f"{dist}: declared floor {floor} < {first}, the first with {api}"


# Private names of libraries vitlab reaches into (no public alternative): each with the vitlab code that
# does, a check that the installed release still has it, and the cap on the tested major in pyproject.
PRIVATE = [
    ("lightning", "<3", "fit_loop._combined_loader (VitlabTask._scheduler: exact mid-epoch resume)",
     lambda: "_combined_loader" in inspect.getsource(importlib.import_module("lightning.pytorch.loops.fit_loop"))),
    ("hydra-core", "<1.4", "hydra._internal BasicSweeper._parse_config (vitlab.tools.plan)",
     lambda: hasattr(importlib.import_module("hydra._internal.core_plugins.basic_sweeper").BasicSweeper,
                     "_parse_config")),
    ("timm", "<2", "timm.models._registry.register_model (vitlab.tools.bench: authors' files register models)",
     lambda: hasattr(importlib.import_module("timm.models._registry"), "register_model")),
    ("torchvision", "<=0.29.1", "ops.poolers._setup_scales / _filter_input, detection._utils.BoxCoder",
     lambda: all(hasattr(importlib.import_module("torchvision.ops.poolers"), n)
                 for n in ("_setup_scales", "_filter_input", "_convert_to_roi_format"))
     and hasattr(importlib.import_module("torchvision.models.detection._utils"), "BoxCoder")),
]


@pytest.mark.parametrize("dist, cap, use, works", PRIVATE, ids=[r[0] for r in PRIVATE])
def test_private_apis_exist_and_their_major_is_capped(dist, cap, use, works):
    assert works(), f"the installed {dist} lost {use}"
    specs = {str(s) for reqs in declared().values() for r in reqs if canonical(r.name) == dist for s in r.specifier}
    assert cap in specs, f"{dist}: vitlab uses {use}; cap it ({cap}) in pyproject.toml"
