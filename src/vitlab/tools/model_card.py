"""The Hugging Face model card written beside an exported model, and ``--push`` to the Hub.

``write_model_card`` writes ``README.md``: YAML front matter made by ``huggingface_hub``'s
``ModelCardData`` (library_name, tags, datasets, metrics, pipeline_tag and a ``model-index`` with
the run's final validation results, which the Hub shows as evaluation results), then the
architecture, parameters / GFLOPs, the backbone config, the training recipe, the final metrics of
``<run dir>/summary.json``, how to load the files, and the command that reproduces the run.
``push`` uploads the folder with ``huggingface_hub.HfApi``.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

# task -> (Hub pipeline tag, dataset id on the Hub, summary key -> (metric type, name))
TASKS = {
    "classification": ("image-classification", "imagenet-1k",
                       {"val/top1": ("accuracy", "Top-1 accuracy"), "val/top5": ("accuracy", "Top-5 accuracy")}),
    "detection": ("object-detection", "detection-datasets/coco",
                  {"val/bbox_mAP": ("mAP", "box AP"), "val/segm_mAP": ("mAP", "mask AP")}),
    "segmentation": ("image-segmentation", "scene_parse_150", {"val/mIoU": ("mean_iou", "mIoU")}),
}
LOADING = {
    "official": "the authors' code: `model.load_state_dict(torch.load('model.pth'){state_dict})`",
    "timm": "`timm.create_model('hf-hub:USER/REPO', pretrained=True)` for a classifier pushed with its config.json "
            "(`'local-dir:DIR'` for this folder); or `timm.create_model(ARCH, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='model.safetensors'{classes}))` with the architecture fields below",
    "mmdet": "an mmdetection / mmsegmentation config: `backbone=dict(..., init_cfg=dict(type='Pretrained', "
             "prefix='backbone.', checkpoint='model.pth'))`",
}


def run_summary(ckpt_path: str | Path) -> dict:
    """``<run dir>/summary.json`` of the checkpoint's run (``<run dir>/checkpoints/*.ckpt``), or {}."""
    path = Path(ckpt_path).resolve().parent.parent / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_model_card(out_dir: Path, module, config: dict, ckpt_path: str, result: dict) -> Path:
    from vitlab.runtime.extras import require
    from vitlab.runtime.flops import count_params

    hub = require("huggingface_hub", "export", "the model card of vitlab.tools.export")
    EvalResult, ModelCardData = hub.EvalResult, hub.ModelCardData

    summary = run_summary(ckpt_path)
    kind, fmt = result["task"], result["format"]
    pipeline, dataset, metric_names = TASKS[kind]
    synthetic = bool(config.get("data", {}).get("synthetic"))
    name = summary.get("backbone") or config.get("backbone", {}).get("model_name") or result["family"]
    dataset_name = "generated data (data.synthetic=true)" if synthetic else dataset
    evals = [EvalResult(task_type=pipeline, dataset_type="synthetic" if synthetic else dataset, dataset_name=dataset_name,
                        dataset_split="validation", metric_type=mtype, metric_name=mname, metric_value=round(summary[key], 4))
             for key, (mtype, mname) in metric_names.items() if isinstance(summary.get(key), (int, float))]
    data = ModelCardData(
        library_name="timm" if fmt == "timm" else "pytorch", pipeline_tag=pipeline,
        tags=["vitlab", result["family"], name, f"{fmt}-layout", *([] if fmt != "mmdet" else ["mmdetection"])],
        datasets=None if synthetic else [dataset], metrics=sorted({m for m, _ in metric_names.values()}),
        model_name=f"{name} ({kind}, vitlab)", eval_results=evals or None,
    )
    params = summary.get("params", count_params(module.model))
    metrics = {k: v for k, v in summary.items() if k.startswith("val/") and isinstance(v, (int, float))}
    container = result.get("container")
    loading = LOADING[fmt].format(state_dict=f"['{container}']" if container else "", name=name,
                                  classes=f", num_classes={module.info.num_classes}" if result["part"] == "model" else "")
    overrides = summary.get("overrides")
    body = [
        f"# {name}: {kind} ({'backbone' if result['part'] == 'backbone' else 'whole model'}), {fmt} layout", "",
        f"Trained with vitlab and exported by `python -m vitlab.tools.export "
        f"ckpt_path=... --format {fmt} --part {result['part']}`.", "",
        "## Architecture", "",
        f"- family: `{result['family']}`, backbone `{name}`",
        f"- parameters: {params:,} (the trained model); GFLOPs: {summary.get('gflops', 'n/a')} "
        f"at {'x'.join(map(str, module.info.input_size))}",
        f"- input: {'x'.join(map(str, module.info.input_size))}, {module.info.num_classes} classes", "",
        "## Files", "",
        f"- `model.pth`, `model.safetensors`: the same {result['tensors']} tensors in the {fmt} key layout",
        f"- loading: {loading}", "",
        "## Backbone config", "", "```yaml", yaml.safe_dump(config.get("backbone", {}), sort_keys=True).strip(), "```", "",
        "## Training recipe", "", "```yaml",
        yaml.safe_dump({"schedule": config.get("schedule", {}), "seed": config.get("seed")}, sort_keys=True).strip(),
        "```", "",
        "## Results (final validation, `summary.json`)", "",
        *(["| metric | value |", "| --- | --- |", *(f"| {k} | {v:.4g} |" for k, v in metrics.items())] if metrics
          else ["No summary.json beside the checkpoint: no results recorded."]), "",
        "## Reproduce", "",
        "```bash",
        f"python src/train.py {shlex.join(overrides)}" if overrides is not None else "# the run's overrides are in summary.json",
        "```", "",
    ]
    path = out_dir / "README.md"
    path.write_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return path


def push(folder: str | Path, repo_id: str) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing); the commit's URL.
    No token, offline mode or no network: a RuntimeError that says which."""
    from vitlab.runtime.extras import require

    hub = require("huggingface_hub", "export", "vitlab.tools.export --push")
    httpx = require("httpx", "export", "vitlab.tools.export --push")  # huggingface_hub 1.x's HTTP client
    HfApi, constants, get_token = hub.HfApi, hub.constants, hub.get_token
    HfHubHTTPError, OfflineModeIsEnabled = hub.errors.HfHubHTTPError, hub.errors.OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"HF_HUB_OFFLINE is set, so nothing was uploaded; the files stay in {folder}")
    token = get_token()
    if not token:
        raise RuntimeError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded; "
                           f"the files stay in {folder})")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="vitlab.tools.export")
    except OfflineModeIsEnabled as err:
        raise RuntimeError(f"HF_HUB_OFFLINE is set, so nothing was uploaded ({err}); the files stay in {folder}") from err
    except httpx.TransportError as err:  # no route to the Hub: DNS, refused, timeout
        raise RuntimeError(f"cannot reach the Hugging Face Hub ({type(err).__name__}: {err}); nothing was uploaded, "
                           f"the files stay in {folder}") from err
    except HfHubHTTPError as err:
        raise RuntimeError(f"the Hub refused the upload to {repo_id}: {err}") from err
    return commit.commit_url
