"""Figures by default and a hub-ready model card.

The heatmap of a merge colours each candidate's difference from the winner at its depth and writes
the scores in the cells; every merge draws its figures (matplotlib is a dependency), the default
merge included. The card's front matter is read back with huggingface_hub's own ModelCard, for
local candidates and for hub candidates from an offline huggingface_hub cache (test_hub's helpers).
"""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from helpers import REPO, api_merge, run_merge
from huggingface_hub import ModelCard
from test_hub import run_cli as run_hub_cli

from examples.tiny_models import build_hub_cache, build_model
from nerd import heatmaps
from nerd.card import base_license, card_metadata, front_matter_of, hub_card
from nerd.config import Selection
from nerd.plan import Choice

APACHE_CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n# A tiny base\n\nIts own card.\n"


def synthetic_plan(scores: np.ndarray, winners: list[int], **selection) -> SimpleNamespace:
    """What merge_heatmap reads of a plan: scores[candidate, depth] and each depth's winner."""
    candidates = [f"org/cand-{i}" for i in range(scores.shape[0])]
    choices = [
        Choice(str(d), d, {c: float(scores[i, d]) for i, c in enumerate(candidates)}, candidates[w], ())
        for d, w in enumerate(winners)
    ]
    return SimpleNamespace(candidates=candidates, choices=choices, selection=Selection(**selection))


def captured_heatmap(monkeypatch, plan, tmp_path) -> dict:
    """The arguments merge_heatmap draws with, and the name it returns."""
    seen = {}

    def fake(path, values, candidates, title, label, boxes, lower_wins=False, cells=None, columns=None, **_):
        seen.update(path=path, values=values, label=label, boxes=boxes, lower_wins=lower_wins, cells=cells)
        seen.update(columns=columns, title=title)

    monkeypatch.setattr(heatmaps, "heatmap", fake)
    seen["name"] = heatmaps.merge_heatmap(plan, tmp_path)
    return seen


def test_the_heatmap_colours_the_difference_from_each_depths_winner(monkeypatch, tmp_path):
    # depth 0 scores about 0.5, depth 1 about 0.9: coloured by score the depth would be all one sees
    scores = np.array([[0.51234, 0.90001], [0.51230, 0.95]])
    seen = captured_heatmap(monkeypatch, synthetic_plan(scores, [0, 1]), tmp_path)
    assert seen["name"] == "heatmap_ner.png" and seen["path"] == tmp_path / "heatmap_ner.png"
    np.testing.assert_allclose(seen["values"], [[0, 0.90001 - 0.95], [0.51230 - 0.51234, 0]], atol=1e-15)
    assert not seen["lower_wins"] and seen["boxes"] == [(0, 0), (1, 1)]
    assert "minus the winner's" in seen["label"] and "0: the winner" in seen["label"]
    # the smallest difference is 4e-5: the scores get the digits that show it
    assert seen["cells"].tolist() == [["0.51234\n0", "0.90001\n-0.05"], ["0.5123\n-4e-05", "0.95\n0"]]


def test_a_lower_wins_heatmap_is_behind_negative_too(monkeypatch, tmp_path):
    scores = np.array([[2.0, 3.5], [2.25, 3.0]])
    seen = captured_heatmap(monkeypatch, synthetic_plan(scores, [0, 1], goal="min"), tmp_path)
    np.testing.assert_allclose(seen["values"], [[0, -0.5], [-0.25, 0]])
    assert "winner's mean ner minus this one's" in seen["label"]
    assert seen["cells"][1, 0] == "2.25\n-0.25"


def test_scores_get_the_digits_their_smallest_difference_needs():
    values = np.array([[0.912345678, 0.5], [0.912345670, 0.4]])
    gaps = heatmaps.winner_gaps(values, [0, 0], lower_wins=False)
    assert heatmaps.score_digits(values, gaps) == 8  # 8e-9 apart: capped at MOST_DIGITS
    cells = heatmaps.gap_cells(values, gaps)
    assert cells[0, 0].split("\n")[0] != cells[1, 0].split("\n")[0]
    assert heatmaps.score_digits(np.array([[12.0, 11.0]]), np.array([[0.0, -1.0]])) == 4
    nan = np.array([[0.5, math.nan], [0.4, 0.3]])
    assert heatmaps.gap_cells(nan, heatmaps.winner_gaps(nan, [0, 1], False))[0, 1] == ""


@pytest.mark.parametrize("candidates,depths", [(2, 4), (3, 32)])
def test_heatmaps_of_few_and_many_depths_are_drawn(tmp_path, candidates, depths):
    rng = np.random.default_rng(depths)
    scores = 0.6 + 0.3 * np.linspace(0, 1, depths) + rng.normal(0, 1e-3, (candidates, depths))
    name = heatmaps.merge_heatmap(synthetic_plan(scores, list(np.argmax(scores, axis=0))), tmp_path)
    image = plt.imread(tmp_path / name)
    height, width = image.shape[:2]
    if depths > heatmaps.TALL_FROM:  # the depths run down the page, which it fits across
        assert width < 1000 and height > 40 * depths
    else:
        assert 600 < width < 1000 and 250 < height < width
    assert image[..., :3].std() > 0.1  # drawn, not blank


def with_non_layer(plan: SimpleNamespace, scores: list[float], winner: int) -> SimpleNamespace:
    """The plan with its non-layer group's choice first, as select.choices_of makes it."""
    group = Choice("non-layer", None, dict(zip(plan.candidates, scores)), plan.candidates[winner], ())
    plan.choices = [group, *plan.choices]
    return plan


def test_the_non_layer_group_is_a_column_of_the_figure_when_it_competes(monkeypatch, tmp_path):
    scores = np.array([[0.5, 0.9], [0.51, 0.95]])
    competing = with_non_layer(synthetic_plan(scores, [1, 1], non_layer="compete"), [0.8, 0.7], 0)
    columns = heatmaps.figure_choices(competing)
    assert [heatmaps.column_label(c) for c in columns] == ["non-layer", "0", "1"]
    np.testing.assert_allclose(heatmaps.score_matrix(competing, columns), [[0.8, 0.5, 0.9], [0.7, 0.51, 0.95]])
    from_base = with_non_layer(synthetic_plan(scores, [1, 1]), [0.8, 0.7], 0)  # taken from the base: no column
    assert [heatmaps.column_label(c) for c in heatmaps.figure_choices(from_base)] == ["0", "1"]

    seen = captured_heatmap(monkeypatch, competing, tmp_path)  # coloured by the difference from its winner, boxed
    np.testing.assert_allclose(seen["values"][:, 0], [0, 0.7 - 0.8])
    assert seen["boxes"] == [(0, 0), (1, 1), (1, 2)] and seen["cells"][1, 0] == "0.7\n-0.1"
    assert seen["columns"] == ["non-layer", "0", "1"] and "\nnon-layer: the embeddings" in seen["title"]
    assert captured_heatmap(monkeypatch, from_base, tmp_path)["columns"] == ["0", "1"]
    monkeypatch.undo()
    image = plt.imread(tmp_path / heatmaps.merge_heatmap(competing, tmp_path))
    assert image[..., :3].std() > 0.1  # drawn, not blank


def test_a_merge_whose_non_layer_group_competes_draws_it(llama_family, tmp_path):
    family = llama_family(2)
    plan = api_merge([family["base"], family["ft-a"]], tmp_path / "out", selection={"non_layer": "compete"})
    columns = heatmaps.figure_choices(plan)
    assert [heatmaps.column_label(c) for c in columns] == ["non-layer", "0", "1"]
    keys = [heatmaps.column_label(c) for c in columns]
    compatibility = heatmaps.compatibility_matrix(plan.tethers, keys, [str(family["ft-a"])])
    assert compatibility[0, 0] == plan.tethers.scores["non-layer"][str(family["ft-a"])] > 0.5
    for name in ("heatmap_ner.png", "heatmap_compatibility.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG"), name


def test_front_matter_of_a_card(tmp_path):
    card = tmp_path / "README.md"
    for text, expected in [
        (APACHE_CARD, {"license": "apache-2.0", "language": "en"}),
        ("---\r\nlicense: mit\r\n---\r\nbody", {"license": "mit"}),
        ("# no front matter\nlicense: mit\n", {}),
        ("---\nlicense: [unclosed\n---\n", {}),
        ("---\n- a list\n---\n", {}),
    ]:
        card.write_text(text, newline="")
        assert front_matter_of(card) == expected, text


def test_the_license_is_the_bases_card_s(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    plan = SimpleNamespace(base="base", sources={"base": base}, revisions={"base": None})
    assert base_license(plan) == {}  # no card
    (base / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\ntags: [x]\n---\n"
    )
    assert base_license(plan) == {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"}
    (base / "README.md").write_text("---\nlicense:\n  - mit\n  - apache-2.0\nlicense_name: '  '\n---\n")
    assert base_license(plan) == {}  # not one-line strings: left out


def test_card_metadata_of_hub_and_local_candidates(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    names = ["org/base@v2", "org/base@v1", str(tmp_path / "local"), "org/ft"]
    plan = SimpleNamespace(
        base="org/base@v2",
        candidates=names,
        sources={n: base if n == "org/base@v2" else tmp_path for n in names},
        revisions={"org/base@v2": "a" * 40, "org/base@v1": "b" * 40, names[2]: None, "org/ft": "c" * 40},
    )
    (base / "README.md").write_text("---\nlicense: mit\n---\n")
    (base / "modules.json").write_text("[]")
    assert card_metadata(plan) == {
        "base_model": ["org/base", "org/ft"],
        "base_model_relation": "merge",
        "library_name": "sentence-transformers",  # the base is a sentence-transformers model
        "license": "mit",
        "tags": ["merge", "mastermerge"],
    }


def test_a_hub_card_that_cannot_be_had_is_none(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_card("testorg/nowhere", "0" * 40) is None


def test_a_local_merge_has_a_parsable_card_with_the_bases_license(llama_family, tmp_path):
    family = llama_family(2)
    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    (base / "README.md").write_text(APACHE_CARD)
    out = tmp_path / "out"
    api_merge([base, family["ft-a"], family["ft-b"]], out)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mastermerge"]
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()  # all local
    assert "language" not in card.data.to_dict()  # only the license is the base's
    assert card.text.startswith("# Composite model") and "- `base` (base, local)\n- `ft-a` (local)\n" in card.text
    assert str(tmp_path) not in card.text and str(family["ft-b"].parent) not in card.text  # by name, no path
    assert "Its own card" not in card.text
    assert "![heatmap ner](heatmap_ner.png)" in card.text
    assert (out / "heatmap_ner.png").read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def hub_family(tmp_path_factory):
    """testorg/card-base (its README.md declares apache-2.0) and testorg/card-ft@v1 in a
    huggingface_hub cache, and a local fine-tune."""
    root = tmp_path_factory.mktemp("card-hub")
    base = build_model("llama", root / "base", seed=0)
    (base / "README.md").write_text(APACHE_CARD)
    ft = build_model("llama", root / "ft", seed=1, base_dir=base, noise=0.05)
    local = build_model("llama", root / "local-ft", seed=2, base_dir=base, noise=0.2)
    hf_home = root / "hf"
    build_hub_cache(hf_home, "testorg/card-base", base)
    build_hub_cache(hf_home, "testorg/card-ft", ft, revision="v1")
    build_hub_cache(hf_home, "testorg/card-ft", local, revision="v2")
    return {"hf_home": hf_home, "local": local}


def test_hub_candidates_are_the_cards_base_models(hub_family, tmp_path):
    out = tmp_path / "out"
    config = {
        "models": ["testorg/card-base", "testorg/card-ft@v1", "testorg/card-ft@v2", str(hub_family["local"])],
        "base_model": "testorg/card-base",
        "output_dir": str(out),
    }
    run = run_hub_cli(hub_family, config, tmp_path)  # HF_HUB_OFFLINE=1
    assert run.returncode == 0, run.stderr
    card = ModelCard.load(out / "README.md")
    # two revisions of one repo are one id; the local candidate names no repo
    assert card.data.base_model == ["testorg/card-base", "testorg/card-ft"]
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mastermerge"]
    assert "- `testorg/card-ft@v1`\n- `testorg/card-ft@v2`\n- `local-ft` (local)\n" in card.text  # the body lists all
    front = (out / "README.md").read_text().split("---\n")[1]
    assert list(yaml.safe_load(front)) == ["base_model", "base_model_relation", "library_name", "license", "tags"]


def test_the_default_merge_writes_its_figures_and_the_card_shows_them(tmp_path):
    config = yaml.safe_load((REPO / "mastermerge_config.yaml").read_text())
    config["models"] = [str(REPO / m) for m in config["models"]]
    config["base_model"] = str(REPO / config["base_model"])
    config["evaluate"]["texts"] = [str(REPO / t) for t in config["evaluate"]["texts"]]
    config["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_merge(path, cache=tmp_path / "c.sqlite").ok()
    out = Path(result["output_dir"])
    text = (out / "README.md").read_text()
    for name in ("heatmap_ner.png", "heatmap_compatibility.png", "perplexity.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"]({name})" in text, name
    assert ModelCard.load(out / "README.md").data.tags == ["merge", "mastermerge"]
    assert json.loads((out / "merge_report.json").read_text())["plan"]["choices"]
