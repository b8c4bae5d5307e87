"""``create_model_and_transforms``: OpenFlamingo v2's factory, on current transformers and open_clip.

Same arguments, same returned triple ``(model, image_processor, tokenizer)``, the same special tokens
in the same order and the same freezing. Additions: ``device``/``dtype`` (``device="meta"`` builds
the skeleton from configs alone, allocating nothing and loading no weights), revisions for the LM
and tokenizer, and open_clip model-config JSON files as ``clip_vision_encoder_path``. Remote code
is off by default: every supported family has a native transformers class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckpt_tools.errors import UsageError
from ckpt_tools.provenance import WeightSource, record

from .config import FLAMINGO_SPECIAL_TOKENS, PAD_TOKEN
from .flamingo import Flamingo

# open_clip's weight files in a hub repo, in the order it looks for them
OPEN_CLIP_WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
PROBE_TIMEOUT = 5.0  # seconds to learn that the hub cannot be reached
# JSON config files already handed to open_clip (its registry rescans every path on each add)
_registered_clip_configs: set[Path] = set()


def create_model_and_transforms(
    clip_vision_encoder_path: str,
    clip_vision_encoder_pretrained: str | None,
    lang_encoder_path: str,
    tokenizer_path: str,
    cross_attn_every_n_layers: int = 1,
    use_local_files: bool = False,
    decoder_layers_attr_name: str | None = None,
    freeze_lm_embeddings: bool = False,
    cache_dir: str | None = None,
    *,
    lang_encoder_revision: str | None = None,
    tokenizer_revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **flamingo_kwargs: Any,
):
    """Build a Flamingo model from an open_clip vision encoder and a Hugging Face causal LM.

    clip_vision_encoder_path: an open_clip model name (``ViT-L-14``), ``hf-hub:``/``local-dir:``
    reference, or a model-config JSON file; clip_vision_encoder_pretrained: open_clip's pretrained
    tag or weights file (None: random init). lang_encoder_path / tokenizer_path: hub ids or local
    folders. Returns ``(model, image_processor, tokenizer)``.

    Example:
        model, image_processor, tokenizer = create_model_and_transforms(
            "ViT-L-14", "openai", "anas-awadalla/mpt-7b", "anas-awadalla/mpt-7b",
            cross_attn_every_n_layers=4,
            lang_encoder_revision="68e1a8e0ebb9b30f3c45c1ef6195980f29063ae2")
    """
    device = torch.device(device)
    on_meta = device.type == "meta"
    hub = {"local_files_only": use_local_files, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    vision_encoder, image_processor, vis_dim = load_vision_encoder(
        clip_vision_encoder_path, None if on_meta else clip_vision_encoder_pretrained, device=device,
        cache_dir=cache_dir)
    tokenizer = load_tokenizer(tokenizer_path,
                               revision=tokenizer_revision or (lang_encoder_revision
                                                               if tokenizer_path == lang_encoder_path else None),
                               **hub)
    lang_encoder, lm_missing = load_lang_encoder(lang_encoder_path, revision=lang_encoder_revision,
                                                 device=device, dtype=dtype, with_missing=True, **hub)
    # growing a meta embedding cannot sample new rows from the old ones' statistics
    lang_encoder.resize_token_embeddings(len(tokenizer), **({"mean_resizing": False} if on_meta else {}))
    with torch.device(device) if on_meta else contextlib.nullcontext():
        model = Flamingo(vision_encoder, lang_encoder,
                         eoc_token_id=tokenizer.convert_tokens_to_ids(FLAMINGO_SPECIAL_TOKENS[0]),
                         media_token_id=tokenizer.convert_tokens_to_ids(FLAMINGO_SPECIAL_TOKENS[1]),
                         vis_dim=vis_dim, cross_attn_every_n_layers=cross_attn_every_n_layers,
                         decoder_layers_attr_name=decoder_layers_attr_name, **flamingo_kwargs)
    model.to(device=device, dtype=dtype)
    freeze_backbones(model, freeze_lm_embeddings=freeze_lm_embeddings)
    if not on_meta:
        record_sources(model, vision=vision_source(clip_vision_encoder_path, clip_vision_encoder_pretrained),
                       lang=lang_source(lang_encoder_path, lang_encoder_revision, cache_dir=cache_dir),
                       lang_missing=lm_missing)
    return model, image_processor, tokenizer


def add_special_tokens(tokenizer) -> None:
    """OpenFlamingo's tokens, in its order: ``<|endofchunk|>``, ``<image>``, then ``<PAD>`` if needed."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(FLAMINGO_SPECIAL_TOKENS)})
    if tokenizer.pad_token is None:
        # the training code masks padding out of the loss through pad_token_id
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def load_tokenizer(path: str, *, revision: str | None = None, **hub: Any):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, **hub)
    add_special_tokens(tokenizer)
    return tokenizer


def load_lang_encoder(path: str, *, revision: str | None = None, device: torch.device,
                      dtype: torch.dtype | None = None, with_missing: bool = False, **hub: Any):
    """The causal LM from a hub id or folder; on the meta device from its config alone.
    ``with_missing``: return ``(lm, names the weights did not hold)`` instead, those being random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if device.type == "meta":
        config = AutoConfig.from_pretrained(path, revision=revision, **hub)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=hub.get("trust_remote_code", False))
        return (lm, set(lm.state_dict())) if with_missing else lm
    # OpenFlamingo computed in fp32; transformers 5 would otherwise pick the file's dtype
    lm, info = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype or torch.float32,
                                                    output_loading_info=True, **hub)
    return (lm, set(info.get("missing_keys", ()))) if with_missing else lm


def load_vision_encoder(path: str, pretrained: str | None, *, device: torch.device,
                        cache_dir: str | None = None) -> tuple[nn.Module, Any, int]:
    """``(open_clip model, validation transform, vision width)``; ``path`` may be a config JSON file."""
    import open_clip

    name, config = _clip_name_and_config(path)
    if pretrained and device.type != "meta":
        _check_pretrained_reachable(name, pretrained, cache_dir)
    with torch.device(device) if device.type == "meta" else contextlib.nullcontext(), _quiet_root_warnings(not pretrained):
        clip, _, image_processor = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, cache_dir=cache_dir)
    width = (config or {}).get("vision_cfg", {}).get("width") or clip.visual.transformer.width
    return clip, image_processor, int(width)


def _check_pretrained_reachable(name: str, tag: str, cache_dir: str | None) -> None:
    """A pretrained tag whose weights are neither cached nor reachable fails at once, in one line:
    open_clip would retry the hub for most of a minute and then raise a paragraph."""
    import open_clip
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    hub_id = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "").rstrip("/")
    if not hub_id or Path(tag).is_file():
        return  # a file of weights, or a tag open_clip fetches from elsewhere
    if any(isinstance(try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir), str)
           for filename in OPEN_CLIP_WEIGHT_FILES):
        return
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            get_hf_file_metadata(hf_hub_url(hub_id, OPEN_CLIP_WEIGHT_FILES[0]), timeout=PROBE_TIMEOUT)
            return
        except Exception as exc:  # noqa: BLE001 - any failure to reach the hub means the same to the user
            why = f"the hub cannot be reached ({type(exc).__name__})"
    raise UsageError(
        f"the vision tower's pretrained weights {name}/{tag} ({hub_id}) are not in the cache and {why}",
        fix=f"fetch them where the hub is reachable (ckpt download {hub_id} {OPEN_CLIP_WEIGHT_FILES[0]}) and copy "
            "the cache, or pass a local weights file as clip_vision_encoder_pretrained (ckpt demo --keep DIR "
            "writes a tiny model with its files)")


@contextlib.contextmanager
def _quiet_root_warnings(quiet: bool):
    """open_clip warns on the root logger that no pretrained weights were loaded; when none were
    asked for (a skeleton, a random init) that is the intent, and provenance reports it anyway."""
    import logging

    root = logging.getLogger()
    previous = root.level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


def _clip_name_and_config(path: str) -> tuple[str, dict | None]:
    import open_clip

    file = Path(path)
    if file.suffix == ".json" and file.is_file():
        resolved = file.resolve()
        if resolved not in _registered_clip_configs:
            open_clip.add_model_config(resolved)  # registers the config under the file's stem
            _registered_clip_configs.add(resolved)
        return file.stem, json.loads(file.read_text(encoding="utf-8"))
    return path, open_clip.get_model_config(path)


def input_embeddings(lm: nn.Module) -> nn.Module:
    """The LM's input embedding, through the family table where the class lacks the accessor
    (MosaicGPT, the remote code of MPT-1B)."""
    from .flamingo_lm import get_submodule, lm_family

    try:
        found = lm.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        found = None
    family = lm_family(lm)
    if found is None and family is not None:
        found = get_submodule(lm, family.input_embedding)
    if found is None:
        raise ValueError(f"cannot find the input embedding of {type(lm).__name__}")
    return found


def freeze_backbones(model: Flamingo, *, freeze_lm_embeddings: bool = False) -> None:
    """OpenFlamingo's training setup: only the resampler, the cross-attention blocks and (unless
    ``freeze_lm_embeddings``) the LM's input embedding are trainable."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    for block in model.gated_cross_attn_layers:
        block.requires_grad_(True)
    if not freeze_lm_embeddings:
        input_embeddings(model.lang_encoder).requires_grad_(True)


# -- where the weights came from (ckpt_tools.provenance) --

# a vision weights file up to this size is hashed; a bigger one is named without its digest, so
# building a model never spends seconds reading a file twice
HASH_LIMIT_BYTES = 256 * 2**20
_COMMIT = re.compile(r"snapshots/([0-9a-f]{40})/")


def vision_source(path: str, pretrained: str | None) -> WeightSource | None:
    """Where open_clip took the vision tower's weights from; None when it initialised them randomly."""
    schema, _, identifier = path.partition(":") if path.startswith(("hf-hub:", "local-dir:")) else ("", "", path)
    if schema == "hf-hub":
        return WeightSource("hub", identifier)  # open_clip ignores `pretrained` and loads the repo's weights
    if schema == "local-dir":
        return WeightSource("file", identifier)
    if not pretrained:
        return None
    import open_clip

    name = Path(path).stem if path.endswith(".json") else path
    file = Path(pretrained)
    # open_clip tries a known tag before a file of that name
    if not open_clip.get_pretrained_cfg(name, pretrained) and file.is_file():
        digest = _sha256(file) if file.stat().st_size <= HASH_LIMIT_BYTES else None
        return WeightSource("file", str(file), sha256=digest)
    return WeightSource("pretrained", f"{name}/{pretrained}")


def lang_source(path: str, revision: str | None = None, *, cache_dir: str | None = None) -> WeightSource:
    """The LM's folder, or its hub id at the commit the hub cache resolved ``revision`` to."""
    if Path(path).is_dir():
        return WeightSource("file", str(path))
    return WeightSource("hub", path, revision=_cached_commit(path, revision, cache_dir) or revision)


def record_sources(model: nn.Module, *, vision: WeightSource | None, lang: WeightSource,
                   lang_missing: Collection[str] = ()) -> None:
    """Record the backbones' sources on ``model``; what the factory created (resampler,
    cross-attention, anything the LM's weights lacked) stays unrecorded, i.e. random. The input
    embedding counts as the LM's although resizing added random rows: the trained checkpoint
    replaces the whole embedding."""
    names = [name for name, _ in model.named_parameters()]
    if vision is not None:
        record(model, vision, [n for n in names if n.startswith("vision_encoder.")])
    missing = {f"lang_encoder.{n}" for n in lang_missing}
    record(model, lang, [n for n in names if n.startswith("lang_encoder.") and n not in missing
                         and ".gated_cross_attn_layer." not in n])


def _cached_commit(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a repo id (a path that does not exist)
        return None
    match = _COMMIT.search(Path(found).as_posix()) if isinstance(found, str) else None
    return match.group(1) if match else None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
