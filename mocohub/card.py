"""The model card (``README.md``) of a published mocohub artifact folder or Hub repo.

:func:`model_card` writes it from the model's :class:`~mocohub.artifact.ModelConfig`
alone, so the card, ``config.json`` and the registry never disagree: YAML
front matter the Hugging Face Hub reads (licence, library, tags, pipeline),
then what the model is, where it comes from, its published metrics, how it
must be fed, what it is for, its licence, and how to load it.

Example:
    >>> text = model_card(model.mocohub_config, repo_id="org/moco-v2-r50")
    >>> text.splitlines()[0]
    '---'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mocohub.artifact import ModelConfig

__all__ = ["METRIC_KEYS", "model_card"]

#: meta keys shown as metrics, with their labels
METRIC_KEYS = {
    "imagenet_linear_top1": "ImageNet linear classification top-1 (%)",
    "imagenet_knn_top1": "ImageNet k-NN top-1 (%)",
    "knn_top1": "k-NN top-1 (%)",
    "linear_top1": "Linear classification top-1 (%)",
}
_FORMATS = {
    "reference": "a reference MoCo v1/v2 checkpoint (facebookresearch/moco main_moco.py)",
    "reference_v3": "a reference MoCo v3 checkpoint (facebookresearch/moco-v3 main_moco.py)",
    "mocohub": "a mocohub training checkpoint",
}
_HUB_LICENSES = {"mit", "apache-2.0", "cc-by-4.0", "cc-by-nc-4.0", "bsd-3-clause", "other"}


def _front_matter(meta: Mapping[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    licence = str(meta.get("license", "")).lower()
    data = ModelCardData(
        license=licence if licence in _HUB_LICENSES else ("other" if licence else None),
        library_name="mocohub",
        tags=["moco", "self-supervised", "image-feature-extraction", "pytorch"],
        pipeline_tag="image-feature-extraction",
    )
    return data.to_yaml()


def _feeding(config: ModelConfig) -> str:
    prep = config.preprocessing
    colour = "RGB" if prep.channels == 3 else "grayscale"
    numbers = ", ".join(f"{v:g}" for v in prep.mean), ", ".join(f"{v:g}" for v in prep.std)
    return (
        f"{prep.image_size}x{prep.image_size} {colour} images: other sizes are resized "
        f"(short side {prep.resize_size}, {prep.interpolation}) and centre-cropped, then "
        f"scaled to [0, 1] and normalised with mean ({numbers[0]}) and std ({numbers[1]})."
    )


def model_card(
    config: ModelConfig,
    *,
    repo_id: str | None = None,
    num_params: int | None = None,
) -> str:
    """The ``README.md`` text for a model with ``config`` (Markdown with YAML front matter).

    Args:
        config: the model's config; its ``meta`` supplies the name, paper,
            source, epochs, metrics and licence.
        repo_id: the Hub repo it is published as, for the loading example.
        num_params: parameters of the saved weights, when known.

    Example:
        >>> print(model_card(get_weights("moco_v2_r50_800ep").config()))
    """
    meta = dict(config.meta)
    name = str(meta.get("name") or (repo_id or "").split("/")[-1] or f"mocohub {config.arch}")
    head = (
        f"included as `fc` ({config.head.type}, {config.head.dim}-d); "
        "`mocohub.load(..., head=True)` keeps it"
        if config.head is not None
        else "not included (backbone only)"
    )
    params = num_params or meta.get("num_params")
    output = (
        f"{config.feature_dim}-d class token (`head` is `Identity`)"
        if config.is_vit
        else f"{config.feature_dim}-d pooled features (`fc` is `Identity`)"
        if config.head is None
        else f"{config.head.dim}-d MoCo embedding with the head; {config.feature_dim}-d pooled "
        "features with head=False"
    )
    rows = [
        (
            "Architecture",
            f"{config.arch}, {config.patch_size}x{config.patch_size} patches"
            if config.is_vit  # a ViT has no ResNet width or stem
            else f"{config.arch}, width {config.width}"
            + (", small-image stem" if config.small_stem else ""),
        ),
        ("Output", output),
        ("Projection head", head),
        ("Parameters", f"{int(params):,}" if params else "not stated"),
        ("Input", _feeding(config)),
    ]
    lines = [
        "---",
        _front_matter(meta).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        str(meta.get("description") or f"A MoCo (Momentum Contrast) {config.arch} backbone."),
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Source",
        "",
    ]
    for key, label in (
        ("paper", "Paper"),
        ("source", "Source"),
        ("format", "Original format"),
        ("converted_from", "Original file"),
        ("epochs", "Pre-training epochs"),
        ("dataset", "Pre-training data"),
        ("recipe", "Recipe"),
        ("command", "Training command"),
    ):
        if meta.get(key) not in (None, ""):
            value = _FORMATS.get(str(meta[key]), meta[key]) if key == "format" else meta[key]
            lines.append(f"- {label}: `{value}`" if key == "command" else f"- {label}: {value}")
    lines += ["", "## Metrics", ""]
    metrics = [f"- {label}: {meta[k]}" for k, label in METRIC_KEYS.items() if k in meta]
    lines += metrics or ["No published metrics for these weights."]
    lines += [
        "",
        str(
            meta.get("metrics_protocol")
            or "Metrics are the figures published with the weights, not re-measured here."
        ),
        "",
        "## Intended use",
        "",
        "Image features for retrieval, k-NN or linear classification, clustering, and as the "
        "initialisation of a network fine-tuned on a downstream task. The backbone is not a "
        "classifier by itself. Self-supervised features carry the biases of the images they "
        "were learnt from; check them on your own data before relying on them.",
        "",
        "## Licence",
        "",
        str(meta.get("license") or "Not stated; ask the model's authors before reuse.")
        + (f" ({meta['license_note']})" if meta.get("license_note") else ""),
        "",
        "## How to load",
        "",
        "```python",
        "import mocohub",
        "",
        f'model = mocohub.load("{f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"}")',
        "transform = model.mocohub_config.preprocessing.transform()  # PIL image -> tensor",
        "features = model(transform(image).unsqueeze(0))",
        "```",
        "",
        "The files: `model.safetensors` (the weights, "
        + (
            "timm VisionTransformer key names), `config.json` (architecture, preprocessing, "
            "meta). `mocohub convert` turns the folder into a timm state dict or the DeiT "
            "checkpoint format."
            if config.is_vit
            else "torchvision ResNet key names), `config.json` (architecture, preprocessing, "
            "meta). `mocohub convert` turns the folder into a torchvision state dict or a "
            "detectron2 `.pkl`."
        ),
        "",
    ]
    return "\n".join(lines)
