"""The preset key listings shipped as data (model/data/skeletons/*.json) are the built skeletons'.

If this fails after a change to a preset or an upgrade of transformers/open_clip, regenerate them:
``python scripts/gen_skeletons.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ckpt_tools.presets import available_presets
from ckpt_tools.skeleton import from_json, to_json
from ckpt_tools.targets import preset_side

pytest.importorskip("model.registry")
SHIPPED = {name: p for name, p in sorted(available_presets().items()) if isinstance(p.listing, str | Path)}


def test_every_openflamingo_preset_ships_a_listing():
    from model.registry import specs

    assert set(SHIPPED) == set(specs())


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_shipped_listing_is_the_built_skeletons(name):
    preset = SHIPPED[name]
    shipped = json.loads(Path(preset.listing).read_text(encoding="utf-8"))
    built = to_json(preset_side(preset, cached=False))
    shipped.pop("built_with")
    assert shipped == built


def test_a_listing_reads_back_as_the_same_side():
    side = preset_side("openflamingo-tiny", cached=False)
    again = from_json(json.loads(json.dumps(to_json(side))))
    assert (again.metas, again.groups, again.trainable) == (side.metas, side.groups, side.trainable)
    assert (again.expected, again.ignored) == (side.expected, side.ignored)


def test_a_preset_diff_reads_the_shipped_listing_and_builds_nothing():
    def no_build(*args, **kwargs):
        raise AssertionError("the skeleton was built")

    preset = replace(SHIPPED["openflamingo-9b-vitl-mpt7b"], build=no_build)
    side = preset_side(preset)
    assert side.label == "openflamingo-9b-vitl-mpt7b" and side.preset is preset
    assert len(side.metas) == len(json.loads(Path(preset.listing).read_text())["tensors"])
