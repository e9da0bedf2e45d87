"""``moderator export``: an open_clip model -> a self-describing model directory.

The directory holds the image and text encoders as ONNX (dynamic batch axis), the
tokenizer as a ``tokenizers`` JSON file, the weights as safetensors (for the torch
backend and for later fine-tuning; never pickle), and ``manifest.json`` with
everything the serving runtime needs plus the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Literal

from moderator import __version__
from moderator.encode.model_dir import MANIFEST_FILE, ModelDirectory, sha256_file, staged_directory
from moderator.encode.tokenizer import CLIP_SPLIT_PATTERN, ClipTokenizer
from moderator.encode.torch_backend import WEIGHTS_FILE
from moderator.errors import ModelError, WeightsUnavailable
from moderator.model._deps import require_train_extra
from moderator.schemas import EncoderFile, Manifest, Preprocess, TokenizerSpec, WeightsSource

log = logging.getLogger(__name__)

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
OPSET = 18

_TOKENIZER_PROBES = (
    "a photo of a red circle",
    "Café DÉJÀ vu — naïve résumé!! 😀 𝓗𝓮𝓵𝓵𝓸 日本語のテキスト",
    "it's what they've said; I'd've  \t\n done it",
    "&amp;lt;b&amp;gt; HTML &quot;entities&quot; <start_of_text>",
    "supercalifragilisticexpialidocious " * 20,
)


def bundled_configs_dir() -> Path:
    return Path(str(resources.files("moderator.model") / "configs"))


def register_configs(extra: Path | None = None) -> None:
    """Make moderator's own model configs (and an optional user config) known to open_clip."""
    import open_clip  # noqa: PLC0415

    open_clip.add_model_config(bundled_configs_dir())
    if extra is not None:
        if not extra.is_file():
            raise ModelError(f"model config {extra} does not exist")
        open_clip.add_model_config(extra)


@dataclass
class LoadedModel:
    model: object  # open_clip CLIP
    name: str
    model_cfg: dict
    preprocess_cfg: dict
    weights: WeightsSource
    tokenizer_ref: str  # what open_clip.get_tokenizer() takes for this model


def _offline_hint(name: str, tag: str) -> str:
    return (
        f"could not download pretrained weights {name!r}/{tag!r}. This machine cannot reach the "
        f"model hub. Download the checkpoint on a machine with internet (for example "
        f"`python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"` "
        f"and copy the file from the huggingface cache, or save an open_clip local-dir with "
        f"open_clip_config.json + open_clip_model.safetensors), then run "
        f"`moderator export --model {name} --checkpoint PATH`."
    )


def load_model(
    model: str,
    *,
    pretrained: str | None = None,
    checkpoint: Path | None = None,
    config: Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build the open_clip model with weights from exactly one source."""
    require_train_extra()
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if pretrained and checkpoint:
        raise ModelError("give either a pretrained tag or a checkpoint, not both")
    register_configs(config)
    if config is not None:
        model = config.stem

    ckpt_dir_cfg = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():  # an open_clip "local-dir" (what `moderator finetune` writes)
            cfg_file = checkpoint / "open_clip_config.json"
            if not cfg_file.is_file():
                raise ModelError(f"{checkpoint} is a directory without open_clip_config.json")
            ckpt_dir_cfg = json.loads(cfg_file.read_text())
        elif not checkpoint.is_file():
            raise ModelError(f"checkpoint {checkpoint} does not exist")

    if ckpt_dir_cfg is not None:
        model_cfg = deepcopy(ckpt_dir_cfg["model_cfg"])
        name = ckpt_dir_cfg.get("name") or model
    else:
        model_cfg = open_clip.get_model_config(model)
        if model_cfg is None:
            raise ModelError(
                f"unknown model architecture {model!r}; known: {', '.join(open_clip.list_models())}"
            )
        model_cfg = deepcopy(model_cfg)
        name = model

    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise WeightsUnavailable(
                f"{name!r} has no pretrained tag {pretrained!r}; known tags: {tags or 'none'}"
            )
        # Fail fast instead of retrying for minutes when the hub is unreachable.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                m = open_clip.create_model(name, pretrained=pretrained)
        except Exception as e:  # network errors surface as many types
            raise WeightsUnavailable(_offline_hint(name, pretrained) + f" ({type(e).__name__})") from e
        source = WeightsSource(kind="pretrained", pretrained_tag=pretrained)
    elif checkpoint is not None:
        weights_file = checkpoint / WEIGHTS_FILE if ckpt_dir_cfg is not None else checkpoint
        try:
            if ckpt_dir_cfg is not None:
                m = open_clip.create_model(f"local-dir:{checkpoint}")
            else:
                m = open_clip.create_model(name, pretrained=str(checkpoint))  # weights_only loading
        except Exception as e:
            raise ModelError(f"cannot load checkpoint {checkpoint} into {name}: {e}") from e
        source = WeightsSource(
            kind="checkpoint", checkpoint_path=str(checkpoint),
            checkpoint_sha256=sha256_file(weights_file) if weights_file.is_file() else None,
        )
    else:
        torch.manual_seed(seed)
        m = open_clip.create_model(name, pretrained=None)
        source = WeightsSource(kind="random", seed=seed)

    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(m))
    tokenizer_ref = f"local-dir:{checkpoint}" if ckpt_dir_cfg is not None else name
    return LoadedModel(m.eval(), name, model_cfg, preprocess_cfg, source, tokenizer_ref)


def _tokenizer_json(name: str, tokenizer_ref: str, context_length: int, dest: Path) -> TokenizerSpec:
    """Export open_clip's SimpleTokenizer vocabulary into a ``tokenizers`` JSON file."""
    import open_clip  # noqa: PLC0415
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    oc_tok = open_clip.get_tokenizer(tokenizer_ref)
    if not isinstance(oc_tok, open_clip.tokenizer.SimpleTokenizer):
        raise ModelError(
            f"{name} uses {type(oc_tok).__name__}; only CLIP's BPE tokenizer (SimpleTokenizer) "
            "is exported so far"
        )
    if getattr(oc_tok, "reduction_fn", None) is not None:
        raise ModelError(f"{name}'s tokenizer uses a reduction mask, which is not exported")
    merges = sorted(oc_tok.bpe_ranks, key=oc_tok.bpe_ranks.get)
    bpe = models.BPE(
        vocab=dict(oc_tok.encoder), merges=merges,
        end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.add_special_tokens([oc_tok.decoder[i] for i in oc_tok.all_special_ids])
    tok.save(str(dest))
    clean = {v: k for k, v in {
        "lower": open_clip.tokenizer._clean_lower,
        "whitespace": open_clip.tokenizer._clean_whitespace,
        "canonicalize": open_clip.tokenizer._clean_canonicalize,
    }.items()}.get(oc_tok.clean_fn)
    if clean is None:
        raise ModelError(f"{name}'s tokenizer uses an unknown text clean function")
    spec = TokenizerSpec(
        file=dest.name, context_length=context_length, sot_token_id=oc_tok.sot_token_id,
        eot_token_id=oc_tok.eot_token_id, clean=clean,
    )
    # Refuse to ship a tokenizer that disagrees with open_clip's on known-hard text.
    ours = ClipTokenizer(spec, dest)(list(_TOKENIZER_PROBES))
    theirs = oc_tok(list(_TOKENIZER_PROBES), context_length=context_length).numpy()
    if (ours != theirs).any():
        raise ModelError("exported tokenizer disagrees with open_clip's on the probe texts")
    return spec


def _tower(model, encode: str):
    """One tower of the CLIP model as a module whose output is L2-normalised float32."""
    import torch  # noqa: PLC0415

    class Tower(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return torch.nn.functional.normalize(getattr(self.m, encode)(x).float(), dim=-1)

    return Tower(model)


def _onnx_export(module, example, input_name: str, dest: Path) -> None:
    import torch  # noqa: PLC0415

    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), input_names=[input_name], output_names=["embeddings"],
            dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET,
            verbose=False,
        )
    program.save(str(dest), external_data=False)


EXPORT_STEPS = ("image encoder", "text encoder", "onnx check", "weights + manifest")


def export_model(
    loaded: LoadedModel,
    out_dir: Path,
    *,
    precision: Literal["fp32", "fp16"] = "fp32",
    overwrite: bool = False,
    progress=None,
) -> ModelDirectory:
    """Write the model directory atomically (temp dir, then rename); ``progress(step)`` after
    each of its EXPORT_STEPS."""
    step = progress or (lambda _name: None)
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass --overwrite to replace it)")
    model = loaded.model
    pc = loaded.preprocess_cfg
    size = pc.get("size", model.visual.image_size)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    try:
        preprocess = Preprocess(
            image_size=size, mean=tuple(pc["mean"]), std=tuple(pc["std"]),
            interpolation=pc.get("interpolation", "bicubic"),
            resize_mode=pc.get("resize_mode", "shortest"), fill_color=pc.get("fill_color", 0),
        )
    except ValueError as e:
        raise ModelError(f"{loaded.name}: preprocessing not supported by the runtime: {e}") from e
    context_length = int(model.context_length)

    with staged_directory(out_dir) as tmp:
        tok_spec = _tokenizer_json(loaded.name, loaded.tokenizer_ref, context_length, tmp / TOKENIZER_FILE)
        if precision == "fp16":
            model = model.half()
        dtype = torch.float16 if precision == "fp16" else torch.float32
        pixels = torch.randn(2, 3, *size, dtype=dtype)
        tokens = torch.zeros(2, context_length, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = tok_spec.sot_token_id, tok_spec.eot_token_id
        _onnx_export(_tower(model, "encode_image"), pixels, "pixel_values", tmp / IMAGE_ONNX)
        step(EXPORT_STEPS[0])
        _onnx_export(_tower(model, "encode_text"), tokens, "input_ids", tmp / TEXT_ONNX)
        step(EXPORT_STEPS[1])
        for f in (IMAGE_ONNX, TEXT_ONNX):
            onnx.checker.check_model(str(tmp / f))
        step(EXPORT_STEPS[2])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))

        logit_bias = getattr(model, "logit_bias", None)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = Manifest(
            architecture=loaded.name,
            model_config_json=loaded.model_cfg,
            weights=loaded.weights,
            precision=precision,
            embed_dim=int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None
            else int(loaded.model_cfg["embed_dim"]),
            preprocess=preprocess,
            tokenizer=tok_spec,
            logit_scale=float(model.logit_scale.detach().float().exp()),
            logit_bias=float(logit_bias.detach().float()) if logit_bias is not None else None,
            image_encoder=EncoderFile(file=IMAGE_ONNX, input_name="pixel_values", output_name="embeddings",
                                      input_dtype="float16" if precision == "fp16" else "float32"),
            text_encoder=EncoderFile(file=TEXT_ONNX, input_name="input_ids", output_name="embeddings",
                                     input_dtype="int64"),
            files=files,
            exporter={
                "moderator": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                "onnx": onnx.__version__, "opset": str(OPSET), "numpy": np.__version__,
            },
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        step(EXPORT_STEPS[3])
    return ModelDirectory(out_dir)
