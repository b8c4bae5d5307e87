"""The HTML report: one self-contained page per report dict, checked as text and in a real browser.

The browser tests drive Debian's headless Chromium over the DevTools protocol (tests/cdp_browser.py):
the DOM after the page's scripts ran, the key filter, the copy buttons, keyboard reach, the contrast
of every status colour in both colour schemes, and every request the page attempted.
"""

from __future__ import annotations

import json
import re
import tomllib

import pytest
from cdp_browser import Browser, find_chromium

from ckpt_tools.diff import diff_keys
from ckpt_tools.errors import UsageError
from ckpt_tools.html import GROUP_PREVIEW, STATUSES, build_tree, render_html, rules_file
from ckpt_tools.inspect import inspect_checkpoint
from ckpt_tools.provenance import ProvenanceReport, ProvenanceRow
from ckpt_tools.remap import rules_from_cli, rules_from_dicts

SCRIPT_KEY = "extra.<script>window.pwned=1</script>"
IMG_KEY = 'extra.<img src=x onerror="window.pwned=2">'
COMMAND = "ckpt diff ckpt.safetensors --against model.safetensors --format html --output report.html"
CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (/usr/bin/chromium or `chromium` "
                                                            "on PATH): install Debian's chromium package")


# ---------------------------------------------------------------------------------------------
# real reports from real files


def _save(path, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    types = {"F32": np.float32, "F16": np.float16}
    save_file({k: np.zeros(shape, dtype=types[dtype]) for k, (shape, dtype) in tensors.items()}, str(path))


MODEL = {**{f"enc.layers.{i}.{n}": ((8, 8) if n.endswith("weight") else (8,), "F32")
            for i in range(4) for n in ("attn.weight", "attn.bias", "mlp.weight")},
         "enc.norm.weight": ((8,), "F32"), "head.weight": ((4, 8), "F32"), "head.bias": ((4,), "F32")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """model.safetensors and a checkpoint of it with every kind of problem: a shape mismatch, a cast,
    a missing key, the head under a ``module.`` prefix, and keys that are markup."""
    folder = tmp_path_factory.mktemp("html")
    _save(folder / "model.safetensors", MODEL)
    ckpt = {k: v for k, v in MODEL.items() if not k.startswith(("head.", "enc.norm."))}
    ckpt["enc.layers.2.mlp.weight"] = ((8, 4), "F32")
    ckpt["enc.layers.3.attn.bias"] = ((8,), "F16")
    ckpt["module.head.weight"], ckpt["module.head.bias"] = MODEL["head.weight"], MODEL["head.bias"]
    ckpt[SCRIPT_KEY] = ((2,), "F32")
    ckpt[IMG_KEY] = ((2,), "F32")
    _save(folder / "ckpt.safetensors", ckpt)
    return folder


@pytest.fixture(scope="module")
def diff_data(files):
    return diff_keys(files / "ckpt.safetensors", str(files / "model.safetensors")).to_dict()


def _layout(path) -> dict[str, tuple[tuple[int, ...], str]]:
    data = inspect_checkpoint(path).to_dict()
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in data["tensors"].items()}


@pytest.fixture(scope="module")
def diff_page(files, diff_data):
    path = files / "diff.html"
    path.write_text(render_html("diff", diff_data, command_line=COMMAND, tool_version="0.1.0"), encoding="utf-8")
    return path


def _validate_data(diff_data, inspect_data) -> dict:
    """A validate dict as ValidationReport.to_dict() writes it after a hub download and a load."""
    provenance = ProvenanceReport([ProvenanceRow("enc", "ckpt.safetensors@0123456", 600, 0.9),
                                   ProvenanceRow("enc", "initialised randomly", 64, 0.1)], 64, 664)
    return {"verdict": "fail", "source": "hf://org/model@main/ckpt.safetensors", "target": "model.safetensors",
            "inspect": inspect_data, "diff": diff_data,
            "load": {"loaded": 10, "verified": True, "skipped": ["enc.layers.2.mlp.weight"], "mismatched": [],
                     "checks": []},
            "remote": {"reference": "hf://org/model@main/ckpt.safetensors",
                       "pinned": "hf://org/model@" + "c0ffee" * 6 + "c0ff/ckpt.safetensors",
                       "commit": "c0ffee" * 6 + "c0ff", "bytes_fetched": 4096, "verdict": "fail"},
            "download": {"repo_id": "org/model", "revision": "main", "commit": "c0ffee" * 6 + "c0ff",
                         "files": [{"path": "ckpt.safetensors", "local_path": "/cache/ckpt.safetensors",
                                    "size": 2048, "sha256": "ab" * 32, "bytes_transferred": 2048,
                                    "resumed_from": 0}]},
            "provenance": provenance.to_dict()}


# ---------------------------------------------------------------------------------------------
# the page as text


def test_unknown_kind_is_a_usage_error():
    with pytest.raises(UsageError, match="choose one of inspect, diff, validate"):
        render_html("scan", {}, command_line="", tool_version="0")


def test_keys_are_escaped(diff_page):
    text = diff_page.read_text(encoding="utf-8")
    assert "<script>window.pwned" not in text
    assert 'onerror="window' not in text
    assert text.count("<script") == 1  # the page's own script


def test_the_page_names_no_other_resource(diff_page):
    text = diff_page.read_text(encoding="utf-8")
    assert re.findall(r"\b(?:src|href)=\"(?!data:)[^\"]*\"", text) == []
    assert '<link rel="icon" href="data:,">' in text
    assert "default-src &#x27;none&#x27;" in text


def test_numbered_layers_with_one_signature_collapse():
    from ckpt_tools.html import TensorRow

    rows = [TensorRow(f"m.blocks.{i}.{n}", "matched") for i in range(8) for n in ("a", "b", "c")]
    rows += [TensorRow(f"m.blocks.{i}.x", "missing_unexpected") for i in (1, 3)]
    rows += [TensorRow(f"m.extra.{i}", "stored") for i in range(30)]
    tree = build_tree(rows)
    assert [c.label for c in tree.children] == ["m"]
    assert [c.label for c in tree.children[0].children] == ["blocks", "extra"]
    assert [c.label for c in tree.children[0].children[0].children] == ["{0,2,4..7}", "{1,3}"]


def test_a_single_module_chain_merges_into_one_label():
    from ckpt_tools.html import TensorRow

    rows = [TensorRow(f"a.b.c.{i}.w{j}", "stored") for i in range(3) for j in range(10)]
    assert [c.label for c in build_tree(rows).children] == ["a.b.c.{0..2}"]


def test_odd_key_names_keep_their_place_in_the_tree():
    from ckpt_tools.html import TensorRow

    rows = [TensorRow("a..b", "stored"), TensorRow("a.b", "stored"), TensorRow("top", "stored"),
            TensorRow("².w", "stored"), TensorRow("3.w", "stored")]
    tree = build_tree(rows)
    assert [t.key for t in tree.tensors] == ["top"]
    assert [c.label for c in tree.children] == ["a", "²", "3"]  # only ASCII numbers are layers
    assert sorted(t.key for t in tree.walk()) == sorted(r.key for r in rows)


def test_every_key_of_a_long_problem_group_is_on_the_page():
    problems = [{"kind": "unexpected", "key": f"extra.{i}.w", "detail": "nowhere in the model", "fix": None}
                for i in range(GROUP_PREVIEW + 5)]
    data = {"verdict": "fail", "source": "x", "target": "y", "counts": {"unexpected": len(problems)},
            "problems": problems, "coverage": [], "hints": []}
    page = render_html("diff", data, command_line="ckpt diff x --against y", tool_version="0")
    assert [f"<code>extra.{i}.w</code>" in page for i in range(len(problems))] == [True] * len(problems)
    assert "<summary>5 more unexpected keys</summary>" in page


def test_a_status_the_page_does_not_know_shows_its_name_escaped():
    data = {"verdict": "ok", "source": "x", "target": "y", "counts": {}, "problems": [], "coverage": [],
            "hints": [], "entries": [{"key": "a.w", "status": "<i>new_status</i>"}]}
    page = render_html("diff", data, command_line="", tool_version="0")
    assert '<b class="s-a">&lt;i&gt;new status&lt;/i&gt;</b>' in page


def _rules(rules) -> list[tuple]:
    return [(r.kind, r.args) for r in rules]


def test_a_strip_prefix_fix_becomes_an_equivalent_rules_file():
    text = rules_file("--strip-prefix module.")
    assert text == "[[rule]]\nstrip_prefix = 'module.'\n"
    assert _rules(rules_from_dicts(tomllib.loads(text)["rule"])) == _rules(rules_from_cli(strip_prefix=["module."]))


def test_a_rename_fix_keeps_its_backslashes_in_the_rules_file():
    text = rules_file(r"--rename '\.embed_out$=.lm_head'")
    assert _rules(rules_from_dicts(tomllib.loads(text)["rule"])) == _rules(rules_from_cli(rename=[r"\.embed_out$=.lm_head"]))


def test_a_prose_fix_has_no_rules_file():
    assert rules_file("use the same tokenizer") is None


def test_a_diff_without_entries_shows_its_problem_keys(diff_data):
    data = {k: v for k, v in diff_data.items() if k != "entries"}
    page = render_html("diff", data, command_line=COMMAND, tool_version="0.1.0")
    assert "the tree shows the problem keys only" in page
    assert page.count("<tr><td>enc.norm.weight</td>") == 1


def test_the_9b_layout_against_its_preset_stays_under_300_kb():
    from html_reports import openflamingo_9b

    page = render_html("diff", openflamingo_9b(), command_line="ckpt diff ...", tool_version="0.1.0")
    assert len(page.encode("utf-8")) < 300_000


def test_a_1000_tensor_report_stays_under_1_mb():
    from html_reports import synthetic

    data = synthetic(1000)
    assert len(data["entries"]) == 1005
    page = render_html("diff", data, command_line="ckpt diff ...", tool_version="0.1.0")
    assert len(page.encode("utf-8")) < 1_000_000


# ---------------------------------------------------------------------------------------------
# in the browser


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium found")
    with Browser(CHROMIUM) as b:
        yield b


ROWS = "#tree table.tt tbody tr"
VISIBLE_ROWS = f"Array.from(document.querySelectorAll('{ROWS}')).filter(r => r.checkVisibility()).length"


@needs_browser
def test_the_verdict_comes_first_in_words(browser, diff_page):
    browser.open(diff_page)
    first = browser.evaluate("document.querySelector('header .verdict').textContent")
    assert first.startswith("✗ Verdict: FAIL: the checkpoint does not fit the model")


@needs_browser
def test_every_problem_key_is_on_the_page(browser, diff_page, diff_data):
    browser.open(diff_page)
    shown = browser.evaluate("Array.from(document.querySelectorAll('#problems td:first-child code'), c => c.textContent)")
    assert sorted(shown) == sorted(p["key"] for p in diff_data["problems"])


@needs_browser
def test_markup_in_a_key_is_shown_as_text_and_never_runs(browser, diff_page):
    browser.open(diff_page)
    assert browser.evaluate("typeof window.pwned") == "undefined"
    cells = browser.evaluate(f"Array.from(document.querySelectorAll('{ROWS} td:first-child'), c => c.textContent)")
    assert SCRIPT_KEY in cells
    assert IMG_KEY in cells


@needs_browser
def test_the_filter_narrows_the_tree_to_matching_keys(browser, diff_page, diff_data):
    browser.open(diff_page)
    assert browser.evaluate(VISIBLE_ROWS) == 0  # modules start collapsed
    browser.type_text("#filter", "attn.bias")
    expected = sorted(e["key"] for e in diff_data["entries"] if "attn.bias" in e["key"])
    visible = browser.evaluate(f"Array.from(document.querySelectorAll('{ROWS}')).filter(r => r.checkVisibility())"
                               ".map(r => r.firstChild.textContent)")
    assert sorted(visible) == expected
    assert browser.evaluate("document.getElementById('shown').textContent") == f"4 of {len(diff_data['entries'])} " \
                                                                               "tensors match"


@needs_browser
def test_a_star_in_the_filter_matches_any_characters(browser, diff_page):
    browser.open(diff_page)
    browser.type_text("#filter", "layers.*.mlp")
    assert browser.evaluate(VISIBLE_ROWS) == 4


@needs_browser
def test_clearing_the_filter_restores_the_collapsed_tree(browser, diff_page):
    browser.open(diff_page)
    browser.type_text("#filter", "head")
    browser.evaluate("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'))")
    assert browser.evaluate(VISIBLE_ROWS) == 0
    assert browser.evaluate(f"document.querySelectorAll('{ROWS}[hidden], #tree details[hidden]').length") == 0


@needs_browser
def test_the_copy_button_copies_the_command_with_the_fix(browser, diff_page):
    browser.open(diff_page)
    browser.evaluate("window.copied = []; navigator.clipboard.writeText = t => "
                     "{ window.copied.push(t); return Promise.resolve(); }")
    browser.evaluate("document.querySelector('#problems button[data-copy]').focus()")
    browser.press("Enter", 13, text="\r")
    # without --format and --output: running it prints the fixed report instead of overwriting this page
    assert browser.evaluate("window.copied") == [
        "ckpt diff ckpt.safetensors --against model.safetensors --strip-prefix module."]
    assert browser.evaluate("document.getElementById('live').textContent") == "Copied: Copy command"


@needs_browser
def test_the_page_attempts_no_request(browser, diff_page):
    browser.open(diff_page)
    assert browser.requests() == [diff_page.resolve().as_uri()]
    assert browser.log_entries() == []  # a blocked load or an inline script refused by the CSP logs here


@needs_browser
def test_the_request_check_sees_a_request_when_a_page_makes_one(browser, tmp_path):
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/pixel.png" alt="">')
    browser.open(page)
    assert "http://127.0.0.1:9/pixel.png" in browser.requests()


@needs_browser
def test_a_screenshot_is_saved(browser, diff_page, tmp_path):
    browser.open(diff_page)
    shot = browser.screenshot(tmp_path / "diff-report.png", full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_without_scripts_the_tree_is_readable_and_no_dead_control_shows(browser, diff_page):
    browser.disable_scripts(True)
    try:
        browser.open(diff_page)
        tops = browser.evaluate("Array.from(document.querySelectorAll('#tree > details > summary .nm'), "
                                "s => s.textContent)")
        controls_hidden = browser.evaluate("document.getElementById('controls').checkVisibility()")
        copy_visible = browser.evaluate("Array.from(document.querySelectorAll('button[data-copy]'))"
                                        ".filter(b => b.checkVisibility()).length")
        rows = browser.evaluate(f"document.querySelectorAll('{ROWS}').length")
    finally:
        browser.disable_scripts(False)
    assert tops == ["enc", "head", "extra", "module"]
    assert controls_hidden is False
    assert copy_visible == 0
    assert rows == 19  # the model's 15 tensors and the checkpoint's 4 unexpected ones


@needs_browser
def test_every_input_has_a_label(browser, diff_page):
    browser.open(diff_page)
    unlabelled = browser.evaluate("Array.from(document.querySelectorAll('input, select, textarea'))"
                                  ".filter(i => i.labels.length === 0 && !i.getAttribute('aria-label')).length")
    assert unlabelled == 0


@needs_browser
def test_every_control_is_reachable_with_the_tab_key(browser, diff_page):
    browser.open(diff_page)
    browser.evaluate("window.controls = Array.from(document.querySelectorAll('button, input, summary, a[href]'))"
                     ".filter(c => c.checkVisibility())")
    count = browser.evaluate("window.controls.length")
    reached = set()
    for _ in range(count + 2):
        browser.press("Tab", 9)
        reached.add(browser.evaluate("window.controls.indexOf(document.activeElement)"))
    assert reached - {-1} == set(range(count))


@needs_browser
def test_no_element_is_made_clickable_without_being_a_native_control(browser, diff_page):
    browser.open(diff_page)
    assert browser.evaluate("document.querySelectorAll('[onclick], [tabindex], [role=button]').length") == 0


def _rgb(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", text)[:3])


def _contrast(a: str, b: str) -> float:
    def luminance(rgb):
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted((luminance(_rgb(a)), luminance(_rgb(b))), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@needs_browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_status_colour_has_a_contrast_of_at_least_4_5(browser, diff_page, scheme):
    browser.color_scheme(scheme)
    try:
        browser.open(diff_page)
        classes = sorted({f"s-{s.css}" for s in STATUSES.values()})
        pairs = browser.evaluate(
            f"{json.dumps(classes)}.map(c => {{ const b = document.createElement('b'); b.className = c; "
            "b.textContent = 'x'; document.body.append(b); const s = getComputedStyle(b); "
            "return [c, s.color, s.backgroundColor]; })")
        page = browser.evaluate("[getComputedStyle(document.body).color, getComputedStyle(document.body).backgroundColor]")
        verdict = browser.evaluate("(s => [s.color, s.backgroundColor])(getComputedStyle(document.querySelector('.verdict')))")
    finally:
        browser.color_scheme("light")
    assert {c: round(_contrast(fg, bg), 2) >= 4.5 for c, fg, bg in pairs} == {c: True for c in classes}
    assert _contrast(*page) >= 4.5
    assert _contrast(*verdict) >= 4.5


@needs_browser
def test_the_dark_scheme_changes_the_page_colours(browser, diff_page):
    browser.open(diff_page)
    light = browser.evaluate("getComputedStyle(document.body).backgroundColor")
    browser.color_scheme("dark")
    try:
        dark = browser.evaluate("getComputedStyle(document.body).backgroundColor")
    finally:
        browser.color_scheme("light")
    assert (light, dark) == ("rgb(255, 255, 255)", "rgb(13, 17, 23)")


@needs_browser
def test_a_validate_report_shows_commit_sha256_and_provenance(browser, files, diff_data, tmp_path):
    data = _validate_data(diff_data, inspect_checkpoint(files / "ckpt.safetensors").to_dict())
    page = tmp_path / "validate.html"
    page.write_text(render_html("validate", data, command_line="ckpt validate ...", tool_version="0.1.0"))
    browser.open(page)
    source = browser.evaluate("document.getElementById('source').textContent")
    assert "c0ffee" * 6 + "c0ff" in source
    assert "ab" * 32 in source
    prov = browser.evaluate("Array.from(document.querySelectorAll('#provenance tbody tr'), r => r.textContent)")
    assert prov == ["encckpt.safetensors@012345660090.0%", "encinitialised randomly6410.0%"]
    assert browser.evaluate("document.querySelector('#tree > details .prov').textContent") == \
        "Weights from: enc: ckpt.safetensors@0123456 (90.0%); enc: initialised randomly (10.0%)"


@needs_browser
def test_an_inspect_report_lists_every_tensor(browser, files, tmp_path):
    data = inspect_checkpoint(files / "model.safetensors").to_dict()
    page = tmp_path / "inspect.html"
    page.write_text(render_html("inspect", data, command_line="ckpt inspect model.safetensors --format html",
                                tool_version="0.1.0"))
    browser.open(page)
    browser.type_text("#filter", ".")
    keys = browser.evaluate(f"Array.from(document.querySelectorAll('{ROWS}')).filter(r => r.checkVisibility())"
                            ".map(r => r.firstChild.textContent)")
    assert sorted(keys) == sorted(MODEL)
    assert browser.evaluate("document.getElementById('command').textContent") == \
        "ckpt inspect model.safetensors --format html"


def _fail_page(**diff) -> str:
    data = {"verdict": "fail", "source": "x", "target": "y", "counts": {"unexpected": 1}, "coverage": [],
            "hints": [], "problems": [{"kind": "unexpected", "key": "module.w", "detail": "nowhere",
                                       "fix": "--strip-prefix module."}], **diff}
    return render_html("diff", data, command_line="ckpt diff x --model y --format html --output r.html",
                       tool_version="0")


def test_a_copied_fix_command_prints_its_report_instead_of_overwriting_the_page():
    assert 'data-copy="ckpt diff x --model y --strip-prefix module."' in _fail_page()


def test_the_footer_keeps_the_exact_command_line():
    assert "ckpt diff x --model y --format html --output r.html</code>" in _fail_page()


def test_ambiguous_pairings_are_shown_when_no_rule_is_inferred():
    page = _fail_page(inference={"ambiguous": [{"key": "a.w", "candidates": ["b.w", "c.w"]}]})
    assert "<tr><td><code>a.w</code></td><td><code>b.w</code>, <code>c.w</code></td></tr>" in page


def test_the_verdict_counts_the_keys_the_model_re_creates():
    assert "1 ignored (the model re-creates them)" in _fail_page(ignored=["h.0.attn.bias"])
