"""Where the tiny model's weights come from: the factory records its backbones, a checkpoint the rest."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_tools.provenance import RANDOM, WeightSource, provenance_report, record, sources
from model import registry
from model.factory import create_model_and_transforms, lang_source, vision_source
from model.trained import make_trained_looking, trained_state_dict

XATTN = "gated_cross_attn_layer"
WTE = "lang_encoder.transformer.wte.weight"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return registry.save_tiny_assets(tmp_path_factory.mktemp("tiny"))


def build(assets, lm=None, **kwargs):
    lm = str(lm or assets["lm"])
    model, _, _ = create_model_and_transforms(str(assets["clip"]), str(assets["clip_pretrained"]), lm, lm,
                                              cross_attn_every_n_layers=registry.TINY_EVERY_N, **kwargs)
    return model


def rows(report) -> dict[str, tuple[str, float]]:
    return {r.module: (r.source, r.share) for r in report.rows}


def numel(model, predicate) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if predicate(n))


def test_factory_records_the_backbones_and_leaves_the_new_parts_random(assets):
    model = build(assets)
    report = provenance_report(model, split=(XATTN,))
    assert rows(report) == {
        "vision_encoder": (str(assets["clip_pretrained"]), 1.0),
        "lang_encoder": (str(assets["lm"]), 1.0),
        "perceiver": (RANDOM.label(), 1.0),
        f"lang_encoder ({XATTN})": (RANDOM.label(), 1.0),
    }
    assert report.random_params == numel(model, lambda n: n.startswith("perceiver.") or XATTN in n) > 0
    assert report.verdict == "fail"
    found = sources(model)
    digest = hashlib.sha256(assets["clip_pretrained"].read_bytes()).hexdigest()
    assert found["vision_encoder.conv1.weight"] == WeightSource("file", str(assets["clip_pretrained"]), sha256=digest)
    assert found[WTE] == WeightSource("file", str(assets["lm"]))


def test_the_vision_file_really_holds_the_tower_the_factory_loads(assets):
    model = build(assets)
    saved = load_file(assets["clip_pretrained"])
    tower = model.vision_encoder.state_dict()
    assert tower.keys() == {k.removeprefix("visual.") for k in saved if k.startswith("visual.")}
    assert [k for k in tower if not torch.equal(tower[k], saved[f"visual.{k}"])] == []


def test_a_checkpoint_completes_the_model(assets):
    trained = build(assets)
    filled = make_trained_looking(trained, seed=3)
    state = trained_state_dict(trained)
    assert sorted(filled) == sorted(state)
    model = build(assets)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    source = WeightSource("checkpoint", "checkpoint.pt", revision=COMMIT)
    assert record(model, source, names=state) == len(state)
    report = provenance_report(model, split=(XATTN,))
    assert (report.random_params, report.verdict) == (0, "ok")
    assert rows(report)["perceiver"] == rows(report)[f"lang_encoder ({XATTN})"] == ("checkpoint.pt@0123456", 1.0)
    # the embedding is in the checkpoint, so the LM folder is left with the rest of the LM
    lm_share = 1 - model.lang_encoder.get_input_embeddings().weight.numel() / numel(
        model, lambda n: n.startswith("lang_encoder.") and XATTN not in n)
    assert rows(report)["lang_encoder"] == pytest.approx((str(assets["lm"]), lm_share))
    assert report.summary().endswith("randomly initialised: 0 parameters")


def test_trained_state_dict_has_the_published_layout(assets):
    model = build(assets)
    keys = set(trained_state_dict(model))
    pattern = re.compile(rf"perceiver\..+|lang_encoder\.transformer\.blocks\.\d+\.{XATTN}\..+|{re.escape(WTE)}")
    assert sorted(k for k in keys if not pattern.fullmatch(k)) == []
    assert WTE in keys and "lang_encoder.lm_head.weight" not in keys  # tied to wte: one name per tensor
    assert keys == {n for n, _ in model.named_parameters() if n.startswith("perceiver.") or XATTN in n} | {WTE}
    assert {k.split(".")[3] for k in keys if XATTN in k} == {"1", "3"}  # every 2nd of 4 blocks


def test_make_trained_looking_is_deterministic_with_open_gates():
    first, second, other = (registry.TINY.build(device="cpu") for _ in range(3))
    make_trained_looking(first, seed=7)
    make_trained_looking(second, seed=7)
    make_trained_looking(other, seed=8)
    a, b, c = (trained_state_dict(m) for m in (first, second, other))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(a[WTE], c[WTE])
    gates = torch.cat([v for k, v in a.items() if k.endswith("_gate")])
    assert gates.numel() == 4 and bool(((gates >= 0.1) & (gates <= 0.5)).all())
    norm = a["perceiver.norm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0 < norm.std().item() < 0.05
    assert a[WTE].std().item() == pytest.approx(0.02, rel=0.2)


def test_weights_the_lm_files_lack_stay_random(assets, tmp_path):
    lm = tmp_path / "lm-without-norm"
    shutil.copytree(assets["lm"], lm)
    weights = load_file(lm / "model.safetensors")
    del weights["transformer.norm_f.weight"]
    save_file(weights, lm / "model.safetensors", metadata={"format": "pt"})
    found = sources(build(assets, lm=lm))
    assert found["lang_encoder.transformer.norm_f.weight"] == RANDOM
    assert found["lang_encoder.transformer.blocks.0.ffn.up_proj.weight"] == WeightSource("file", str(lm))


def test_a_meta_build_records_nothing(assets):
    model = build(assets, device="meta")
    assert set(sources(model).values()) == {RANDOM}


def test_an_lm_from_the_hub_cache_is_named_by_repo_and_commit(assets, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-lm"
    shutil.copytree(assets["lm"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model = build(assets, lm="org/tiny-lm", use_local_files=True, cache_dir=str(cache))
    assert sources(model)[WTE] == WeightSource("hub", "org/tiny-lm", revision=COMMIT)
    assert lang_source("org/tiny-lm", COMMIT, cache_dir=str(cache)).revision == COMMIT
    assert lang_source("org/not-cached", "v1", cache_dir=str(cache)) == WeightSource("hub", "org/not-cached", "v1")


@pytest.mark.parametrize("path, pretrained, expected", [
    ("ViT-L-14", "openai", WeightSource("pretrained", "ViT-L-14/openai")),
    ("ViT-L-14", None, None),
    ("ViT-L-14", "", None),
    ("hf-hub:org/clip", None, WeightSource("hub", "org/clip")),
    ("local-dir:/models/clip", None, WeightSource("file", "/models/clip")),
])
def test_vision_sources(path, pretrained, expected):
    assert vision_source(path, pretrained) == expected


def test_tiny_preset_names_its_factory_and_assets(tmp_path):
    from ckpt_tools.modelconfig import _import, _preset_factories
    from ckpt_tools.presets import get_preset

    info = get_preset("openflamingo-tiny").info
    assert (info["factory"], info["assets"]) == ("model.factory:create_model_and_transforms",
                                                  "model.registry:save_tiny_assets")
    assert _preset_factories() == {info["factory"]}
    paths = _import(info["assets"], None)(tmp_path)
    assert sorted(p.name for p in paths.values()) == ["tiny-lm", "tiny-vit.json", "tiny-vit.safetensors"]
