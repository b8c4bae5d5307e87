"""The published OpenFlamingo checkpoints, as data, and the presets ``ckpt_tools`` finds them by.

Each entry says where the file is, which vision encoder, LM and tokenizer it was trained with, the
cross-attention interval, and enough of the LM config to build the model's skeleton offline on the
meta device (for key diffs) without fetching the LM. ``presets()`` is the ``ckpt_tools.models``
entry point. Nothing heavy is imported until a model is built: each preset's skeleton key listing
ships as data (``data/skeletons/NAME.json``, written by ``scripts/gen_skeletons.py`` and checked
against the built skeleton by ``tests/test_skeleton_data.py``), so a key diff builds nothing.

Notes on fidelity:
- MPT-1B (``anas-awadalla/mpt-1b-redpajama-200b``) is remote code (MosaicGPT) that cannot be loaded
  offline; its skeleton uses transformers' native MPT classes with the same sizes. Every key the
  checkpoint holds (resampler, cross-attention, ``transformer.wte``) has the same name and shape;
  only the frozen block internals are named differently, and those are not in the file.
- MPT-7B's remote code has no ``lm_head`` (logits come from ``wte``); native MPT ties ``lm_head`` to
  ``wte``, so the MPT files have no ``lm_head`` key and none is needed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_tools.presets import ModelPreset

from . import checks
from .config import LM_FAMILIES, LMFamily

VIT_L_14 = "ViT-L-14"
FACTORY = "model.factory:create_model_and_transforms"
SKELETONS = Path(__file__).resolve().parent / "data" / "skeletons"

_MPT_1B = {"model_type": "mpt", "d_model": 2048, "n_heads": 16, "n_layers": 24, "expansion_ratio": 4,
           "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "tie_word_embeddings": True}
_MPT_7B = {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4,
           "max_seq_len": 2048, "vocab_size": 50432, "no_bias": True, "tie_word_embeddings": True}
_RPJ_3B = {"model_type": "gpt_neox", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
           "intermediate_size": 10240, "max_position_embeddings": 2048, "vocab_size": 50432,
           "rotary_pct": 1.0, "use_parallel_residual": False, "tie_word_embeddings": False}
_LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "intermediate_size": 11008, "max_position_embeddings": 2048, "vocab_size": 32000,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False}

# GPT-NeoX-20B's tokenizer (used by MPT and RedPajama) has 50277 entries, LLaMA's 32000; the
# special tokens follow in order: <|endofchunk|>, <image>, <PAD>.
_NEOX_TOKENS = {"tokenizer_length": 50280, "eoc_token_id": 50277, "media_token_id": 50278}
_LLAMA_TOKENS = {"tokenizer_length": 32003, "eoc_token_id": 32000, "media_token_id": 32001}

# transformers 5 renamed GPT-NeoX's output head
_EMBED_OUT_TO_LM_HEAD = ({"rename": [r"^lang_encoder\.embed_out\.", "lang_encoder.lm_head."]},)
# OpenFlamingo v1 saved every cross-attention tensor a second time under this alias
_DROP_V1_ALIASES = ({"drop": "lang_encoder.gated_cross_attn_layers.*"},)
# A full OpenFlamingo state dict (``torch.save(model.state_dict())`` with the reference package)
# keeps each LM block under ``blocks.N.decoder_layer.`` and reaches every decoder and xattn block
# under second names too (``old_decoder_blocks``, ``gated_cross_attn_layers``): the same tensors.
# Every preset reads such a file; the rules change nothing in a published trainable-only file.
FULL_STATE_DICT = ({"rename": [r"\.decoder_layer\.", "."]},
                   {"drop": ["lang_encoder.old_decoder_blocks.*", "lang_encoder.gated_cross_attn_layers.*"]})


@dataclass(frozen=True)
class FlamingoSpec:
    """One model layout: vision encoder, LM config, tokenizer size, cross-attention interval."""

    name: str
    description: str
    lm_config: Mapping[str, Any]
    cross_attn_every_n_layers: int
    tokenizer_length: int
    eoc_token_id: int
    media_token_id: int
    vision_encoder: str | Mapping[str, Any] = VIT_L_14  # open_clip model name or config dict
    vision_pretrained: str | None = "openai"
    lang_encoder: str | None = None
    lang_encoder_revision: str | None = None
    tokenizer: str | None = None
    repo_id: str | None = None
    filename: str | None = "checkpoint.pt"
    remap: tuple[Mapping[str, Any], ...] = ()
    notes: str = ""
    seed: int | None = None  # fixed init (the tiny model), so demos are reproducible
    assets: str | None = None  # ``module:function(folder) -> paths`` writing the parts the factory reads
    demo: str | None = None  # ``module:Class`` that ``ckpt demo`` drives (see model/demo.py)

    @property
    def family(self) -> LMFamily:
        return LM_FAMILIES[self.lm_config["model_type"]]

    def build(self, device: Any = "meta", dtype: Any = None):
        """The Flamingo model of this layout, frozen as in training; ``device="meta"``: a skeleton
        with no memory allocated. Weights are random (fixed by ``seed`` where one is set)."""
        import torch

        if self.seed is None:
            return _build(self, torch.device(device), dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return _build(self, torch.device(device), dtype)

    def preset(self) -> ModelPreset:
        return ModelPreset(
            name=self.name, build=self.build, description=self.description, repo_id=self.repo_id,
            filename=self.filename, remap=[dict(rule) for rule in (*self.remap, *FULL_STATE_DICT)],
            expect_missing=expect_missing_globs(self.family), require=require_globs(self.family),
            hints=checks.hints, value_checks=checks.VALUE_CHECKS, info=self.info(),
            listing=listing_path(self.name))

    def info(self) -> dict[str, Any]:
        return {
            "vision_encoder": self.vision_encoder if isinstance(self.vision_encoder, str) else "config",
            "vision_pretrained": self.vision_pretrained,
            "lang_encoder": self.lang_encoder, "lang_encoder_revision": self.lang_encoder_revision,
            "tokenizer": self.tokenizer or self.lang_encoder,
            "cross_attn_every_n_layers": self.cross_attn_every_n_layers,
            "decoder_layers_attr_name": self.family.decoder_layers,
            "tokenizer_length": self.tokenizer_length,
            "lm_config": dict(self.lm_config), "notes": self.notes,
            "factory": FACTORY, "assets": self.assets,
            "demo": self.demo,
            # provenance reports show the trained inserts apart from the LM blocks they sit in
            "provenance_split": ("gated_cross_attn_layer",),
        }


def listing_path(name: str) -> Path:
    """Where the preset's skeleton key listing ships."""
    return SKELETONS / f"{name}.json"


def expect_missing_globs(family: LMFamily) -> tuple[str, ...]:
    """Frozen parts a trainable-weights checkpoint leaves out: the vision tower and every LM tensor
    except the cross-attention blocks and the input embedding. ``[!g]`` after the block index
    excludes ``gated_cross_attn_layer`` (no LM block has a child starting with g)."""
    blocks = (f"lang_encoder.{family.decoder_layers}.{digits}.[!g]*"
              for digits in ("[0-9]", "[0-9][0-9]", "[0-9][0-9][0-9]"))
    return ("vision_encoder.*", *blocks, *(f"lang_encoder.{m}.*" for m in family.other_modules))


def require_globs(family: LMFamily) -> tuple[str, ...]:
    return ("perceiver.*", f"lang_encoder.{family.decoder_layers}.*.gated_cross_attn_layer.*",
            f"lang_encoder.{family.input_embedding}.weight")


def _build(spec: FlamingoSpec, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .factory import freeze_backbones
    from .flamingo import Flamingo

    lm_config = dict(spec.lm_config, vocab_size=spec.tokenizer_length)
    with torch.device(device):
        clip = _clip_from_config(spec.vision_encoder)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_config))
        model = Flamingo(clip, lm, spec.eoc_token_id, spec.media_token_id,
                         vis_dim=_vision_width(clip),
                         cross_attn_every_n_layers=spec.cross_attn_every_n_layers,
                         decoder_layers_attr_name=spec.family.decoder_layers)
    if dtype is not None:
        model.to(dtype=dtype)
    freeze_backbones(model)
    return model.eval()


def _vision_width(clip) -> int:
    return getattr(clip, "visual", clip).transformer.width


def _clip_from_config(vision_encoder: str | Mapping[str, Any]):
    """The open_clip vision tower alone when open_clip exposes its builder (the text tower is
    dropped by Flamingo anyway, and building it costs a third of the 9B skeleton's time)."""
    import open_clip
    import open_clip.model

    config = open_clip.get_model_config(vision_encoder) if isinstance(vision_encoder, str) else vision_encoder
    build_visual = getattr(open_clip.model, "_build_vision_tower", None)
    if build_visual is None:
        return open_clip.CLIP(**config)
    return build_visual(config["embed_dim"], config["vision_cfg"], quick_gelu=config.get("quick_gelu", False))


def _published(suffix: str, *, lang_encoder: str | None, lm_config: Mapping[str, Any], every_n: int,
               tokens: Mapping[str, int], description: str, **extra: Any) -> FlamingoSpec:
    return FlamingoSpec(name=f"openflamingo-{suffix.lower()}", description=description,
                        repo_id=f"openflamingo/OpenFlamingo-{suffix}", lang_encoder=lang_encoder,
                        lm_config=lm_config, cross_attn_every_n_layers=every_n, **tokens, **extra)


_MPT_1B_NOTE = ("LM is remote code (MosaicGPT); the skeleton uses native transformers MPT classes of "
                "the same sizes: the checkpoint's keys are identical")

PUBLISHED: tuple[FlamingoSpec, ...] = (
    _published("3B-vitl-mpt1b", lang_encoder="anas-awadalla/mpt-1b-redpajama-200b", lm_config=_MPT_1B,
               every_n=1, tokens=_NEOX_TOKENS, notes=_MPT_1B_NOTE,
               description="OpenFlamingo-3B: ViT-L-14 + MPT-1B (RedPajama 200B), cross-attention every layer"),
    _published("3B-vitl-mpt1b-langinstruct", lang_encoder="anas-awadalla/mpt-1b-redpajama-200b-dolly",
               lm_config=_MPT_1B, every_n=1, tokens=_NEOX_TOKENS, notes=_MPT_1B_NOTE,
               description="OpenFlamingo-3B, language-instruction-tuned MPT-1B (Dolly)"),
    _published("4B-vitl-rpj3b", lang_encoder="togethercomputer/RedPajama-INCITE-Base-3B-v1",
               lm_config=_RPJ_3B, every_n=2, tokens=_NEOX_TOKENS, remap=_EMBED_OUT_TO_LM_HEAD,
               description="OpenFlamingo-4B: ViT-L-14 + RedPajama-INCITE-Base-3B, cross-attention every 2nd layer"),
    _published("4B-vitl-rpj3b-langinstruct", lang_encoder="togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
               lm_config=_RPJ_3B, every_n=2, tokens=_NEOX_TOKENS, remap=_EMBED_OUT_TO_LM_HEAD,
               description="OpenFlamingo-4B, RedPajama-INCITE-Instruct-3B"),
    _published("9B-vitl-mpt7b", lang_encoder="anas-awadalla/mpt-7b",
               lang_encoder_revision="68e1a8e0ebb9b30f3c45c1ef6195980f29063ae2",
               lm_config=_MPT_7B, every_n=4, tokens=_NEOX_TOKENS,
               description="OpenFlamingo-9B: ViT-L-14 + MPT-7B, cross-attention every 4th layer"),
    _published("9B-deprecated", lang_encoder=None, lm_config=_LLAMA_7B, every_n=4, tokens=_LLAMA_TOKENS,
               remap=_DROP_V1_ALIASES,
               notes="OpenFlamingo v1; the LM is LLaMA-7B in Hugging Face format, supplied by the user",
               description="OpenFlamingo-9B v1 (deprecated): ViT-L-14 + LLaMA-7B, cross-attention every 4th layer"),
)


# -- the tiny model: real, offline, built in a second from the configs below --

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
TINY_WORDS = ("<|endoftext|>", "<unk>", "a", "an", "the", "photo", "picture", "image", "of", "is", "on",
              "in", "and", "with", "cat", "dog", "bird", "car", "tree", "house", "red", "green",
              "blue", "yellow", "black", "white", "square", "circle", "small", "big", "sky", ".", ",")
TINY_LM_CONFIG: dict[str, Any] = {"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 4,
                                  "expansion_ratio": 4, "max_seq_len": 128, "vocab_size": len(TINY_WORDS),
                                  "no_bias": True, "tie_word_embeddings": True}
TINY_EVERY_N = 2

TINY = FlamingoSpec(
    name="openflamingo-tiny", lm_config=TINY_LM_CONFIG, cross_attn_every_n_layers=TINY_EVERY_N,
    tokenizer_length=len(TINY_WORDS) + 3, eoc_token_id=len(TINY_WORDS), media_token_id=len(TINY_WORDS) + 1,
    vision_encoder=TINY_CLIP_CONFIG, vision_pretrained=None, filename=None, seed=0,
    assets="model.registry:save_tiny_assets", demo="model.demo:TinyDemo",
    description="tiny OpenFlamingo (32x32 images, 4-layer MPT-style LM, word-level tokenizer), fully offline",
    notes="weights are random (seed 0); for tests and demos")


def tiny_tokenizer(*, with_flamingo_tokens: bool = True):
    """The tiny model's word-level tokenizer (GPT-style: an end-of-text token and no pad token),
    with OpenFlamingo's special tokens added unless ``with_flamingo_tokens`` is False."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .factory import add_special_tokens

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    if with_flamingo_tokens:
        add_special_tokens(tokenizer)
    return tokenizer


def save_tiny_assets(folder: str | Path) -> dict[str, Path]:
    """Write the tiny model's parts the way ``create_model_and_transforms`` reads them: an open_clip
    config JSON (``clip``), its weights as an open_clip checkpoint file (``clip_pretrained``) and an
    LM folder with config, weights and the plain tokenizer (``lm``).
    ``create_model_and_transforms(paths["clip"], paths["clip_pretrained"], paths["lm"], paths["lm"],
    cross_attn_every_n_layers=TINY_EVERY_N)`` then builds the tiny model with pretrained backbones:
    only the resampler, the cross-attention and the added embedding rows are random."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip = folder / "tiny-vit.json"
    clip.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2), encoding="utf-8")
    clip_weights = folder / "tiny-vit.safetensors"
    lm_dir = folder / "tiny-lm"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY.seed or 0)
        # the whole CLIP: open_clip loads a pretrained file into both towers, strictly
        clip_state = open_clip.CLIP(**TINY_CLIP_CONFIG).state_dict()
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LM_CONFIG))
    save_file({name: tensor.contiguous() for name, tensor in clip_state.items()}, clip_weights)
    lm.save_pretrained(lm_dir)
    tiny_tokenizer(with_flamingo_tokens=False).save_pretrained(lm_dir)
    return {"clip": clip, "clip_pretrained": clip_weights, "lm": lm_dir}


def tiny_model_and_transforms(device: Any = "cpu", dtype: Any = None):
    """``(model, image_processor, tokenizer)`` of the tiny preset, like ``create_model_and_transforms``."""
    import open_clip

    image_processor = open_clip.image_transform(TINY_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    return TINY.build(device=device, dtype=dtype), image_processor, tiny_tokenizer()


@functools.cache
def _specs() -> dict[str, FlamingoSpec]:
    return {spec.name: spec for spec in (*PUBLISHED, TINY)}


def specs() -> dict[str, FlamingoSpec]:
    return dict(_specs())


def presets() -> dict[str, ModelPreset]:
    """The ``ckpt_tools.models`` entry point: ``{preset name: ModelPreset}``."""
    return {name: spec.preset() for name, spec in _specs().items()}


