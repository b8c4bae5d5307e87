from __future__ import annotations

import torch
from torch import nn

from ckpt_tools.provenance import RANDOM, WeightSource, provenance_report, record, sources


def tiny() -> nn.Module:
    model = nn.Module()
    model.vision = nn.Linear(4, 4)
    model.lang = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model.lang[1].xattn = nn.Linear(2, 2)
    model.register_buffer("mask", torch.ones(3))
    return model


def test_unrecorded_parameters_are_random_and_fail_the_verdict():
    model = tiny()
    record(model, WeightSource("pretrained", "ViT-T/demo"), prefix="vision.")
    report = provenance_report(model, split=("xattn",))
    assert report.random_params == 20 + 10 + 6
    assert report.verdict == "fail"
    assert set(sources(model).values()) == {WeightSource("pretrained", "ViT-T/demo"), RANDOM}


def test_complete_model_summary_per_module():
    model = tiny()
    record(model, WeightSource("pretrained", "ViT-T/demo"), prefix="vision.")
    record(model, WeightSource("hub", "org/lm", revision="68e1a8e0ebb9"), prefix="lang.")
    record(model, WeightSource("checkpoint", "checkpoint.pt", revision="abcdef123"), prefix="lang.1.xattn.")
    report = provenance_report(model, split=("xattn",))
    assert report.verdict == "ok"
    assert report.summary() == ("vision: 100% from ViT-T/demo; lang: 100% from org/lm@68e1a8e; "
                                "lang (xattn): 100% from checkpoint.pt@abcdef1; randomly initialised: 0 parameters")
    assert report.to_dict()["total_params"] == 20 + 30 + 6
