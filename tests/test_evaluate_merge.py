"""Evaluation inside a merge: the trained example family, every strategy's composite evaluated in
memory, the better one written, and what was written measured again from its files."""

import json
from pathlib import Path

import pytest
import transformers
from helpers import EXAMPLES, REPO, by_name, config_of, merge, run_merge, transformers_perplexity

from nerd.config import EvaluateOptions
from nerd.windows import text_windows
from nerd.plan import Perplexity
from nerd.strategies import worse_than_base

TEXTS = {domain: REPO / "examples" / "texts" / f"{domain}.txt" for domain in ("code", "docs", "legal")}
MODELS = [EXAMPLES / name for name in ("tiny-base", "tiny-code", "tiny-docs", "tiny-legal")]


def examples_merge(directory: Path, name: str, *flags, **options):
    """The shared merge helper on the example models: config directory / NAME.yaml, output
    directory / NAME."""
    return merge(MODELS, directory, *flags, output=directory / name, config=f"{name}.yaml", **options)


EVALUATE = {"texts": [str(t) for t in TEXTS.values()], "strategies": [{"name": "blend", "tether": {"mode": "blend"}}]}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-merge")
    examples_merge(root, "plain", cache="plain.sqlite").ok()
    run = examples_merge(root, "out", quiet=False, evaluate=EVALUATE)
    return {
        "root": root,
        "result": run.ok(),
        "stderr": run.stderr,
        "plain": run_merge(root / "plain.yaml", "--dry-run", cache=root / "plain.sqlite").ok(),
    }


def rows_of(result) -> dict[tuple[str, str], float]:
    return {(r["model"], r["text"]): r["perplexity"] for r in result["evaluation"]["rows"]}


def test_each_fine_tune_is_best_on_its_own_domain(merged):
    table = rows_of(merged["result"])
    candidates = [str(m) for m in MODELS]
    for domain, text in TEXTS.items():
        best = min(candidates, key=lambda m: table[m, str(text)])
        assert Path(best).name == f"tiny-{domain}", {Path(m).name: table[m, str(text)] for m in candidates}


def test_the_lower_perplexity_strategy_is_written_and_measures_the_same_from_its_files(merged):
    evaluation = merged["result"]["evaluation"]
    scores = {s["name"]: s["score"] for s in evaluation["strategies"]}
    [written] = [s["name"] for s in evaluation["strategies"] if s["written"]]
    assert set(scores) == {"as configured", "blend"} and scores[written] == min(scores.values())
    assert evaluation["runner_up"] != written and evaluation["margin"] == pytest.approx(
        max(scores.values()) - min(scores.values())
    )
    table, out = rows_of(merged["result"]), Path(merged["result"]["output_dir"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    options = EvaluateOptions(tuple(TEXTS.values()), tuple(map(str, TEXTS.values())))
    for text in TEXTS.values():
        windows = text_windows(tokenizer, "causal", text.read_text(), str(text), 128, options, out)
        assert windows.inputs[0][0] == tokenizer.bos_token_id
        assert transformers_perplexity(out, windows, "causal") == pytest.approx(
            table[f"composite: {written}", str(text)], rel=1e-6
        )
    blended = any(c["blend"] for c in merged["result"]["choices"])
    assert blended == (written == "blend")


def test_strategies_cost_no_spectrum_and_the_report_card_and_terminal_show_the_evaluation(merged, capsys):
    result, out = merged["result"], Path(merged["result"]["output_dir"])
    assert result["spectra_computed"] == merged["plain"]["spectra_computed"] + merged["plain"]["spectra_reused"]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["plan"]["evaluation"] == by_name(result["evaluation"], MODELS + list(TEXTS.values()))
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "(written)" in card and "below the runner-up" in card
    assert (
        "![perplexity by model and text](perplexity.png)" in card and (out / "perplexity.png").stat().st_size > 10_000
    )
    config, cache = merged["root"] / "out.yaml", merged["root"] / "c.sqlite"
    run = run_merge(config, "--dry-run", cache=cache, quiet=False, as_json=False)
    printed = run.stdout
    assert run.code == 0 and "vs base" in printed and "written: " in printed and "margin" in printed
    assert all(
        r["reused"] for r in run_merge(config, "--dry-run", cache=cache).ok()["evaluation"]["rows"]
    )  # nothing evaluated twice


def test_every_choice_shows_its_margin_over_the_runner_up(merged):
    for choice in merged["plain"]["choices"]:
        if choice["group"] == "non-layer":  # taken from the base: nothing competed
            assert choice["runner_up"] is None and choice["margin"] is None
            continue
        others = {c: s for c, s in choice["scores"].items() if c != choice["winner"] and s is not None}
        runner = max(others, key=others.get)
        assert choice["runner_up"] == runner
        assert choice["margin"] == pytest.approx(choice["scores"][choice["winner"]] - others[runner], abs=1e-15)
        assert choice["margin"] >= 0


@pytest.mark.parametrize(
    "evaluate, message",
    [
        ({"texts": ["x.txt"]}, "evaluate.texts[0]: text 'x.txt' not found"),
        (
            {"texts": [str(TEXTS["code"])], "strategies": [{"tether": {"mdoe": "blend"}}]},
            "evaluate.strategies[0].tether.mdoe: unknown key; did you mean 'mode'?",
        ),
        (
            {"texts": [str(TEXTS["code"])], "strategies": [{"selection": {"granularity": "row"}}]},
            "evaluate.strategies[0].selection.granularity: expected one of block, tensor, found 'row'",
        ),
        (
            {"texts": [str(TEXTS["code"])], "strategies": [{"name": "x", "selection": {}}]},
            "evaluate.strategies[0]: give the selection or tether settings it changes",
        ),
        (
            {"texts": [str(TEXTS["code"])], "choose_by": "docs.txt"},
            "evaluate.choose_by: expected mean or one of the texts",
        ),
        ({"texts": [str(TEXTS["code"])], "stride": 0}, "evaluate.stride: expected a whole number of tokens >= 1"),
        ({"text": [str(TEXTS["code"])]}, "evaluate.text: unknown key; did you mean 'texts'?"),
    ],
)
def test_bad_evaluate_sections_are_refused_before_anything_runs(tmp_path, evaluate, message):
    run = examples_merge(tmp_path, "out", cache=None, quiet=False, as_json=False, evaluate=evaluate)
    code, err = run.code, run.stderr
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_composite_worse_than_the_base_is_a_warning():
    def row(model, role, value):
        return Perplexity(model, role, "t", "causal", value, 0.0, 1, 1, 8, 4)

    rows = [row("base", "base", 40.8), row("composite: a", "composite", 48.9), row("composite: b", "composite", 40.2)]
    [warning] = worse_than_base(rows, ["t"], "composite: a")
    assert "48.9000) is higher than the base's (40.8000)" in warning
    assert worse_than_base(rows, ["t"], "composite: b") == []


def test_an_expanded_composite_is_evaluated_as_it_will_be_written(merged):
    """dlec with init identity: the deeper composite, built in memory from the rewritten config,
    computes the same function, so it has the unexpanded composite's perplexity; and the written
    expanded model measures the same from its files."""
    root = merged["root"]
    evaluate = {"texts": [str(TEXTS["docs"])]}
    result = examples_merge(
        root, "grown", evaluate=evaluate, dlec={"add_layers": 1, "init": "identity", "importance": "ner"}
    ).ok()
    [composite] = [r for r in result["evaluation"]["rows"] if r["role"] == "composite"]
    assert result["expansion"]["params_after"] > result["expansion"]["params_before"]
    flat = rows_of(merged["result"])["composite: as configured", str(TEXTS["docs"])]
    assert composite["perplexity"] == pytest.approx(flat, rel=1e-5)
    out = Path(result["output_dir"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    options = EvaluateOptions((TEXTS["docs"],), (str(TEXTS["docs"]),))
    windows = text_windows(tokenizer, "causal", TEXTS["docs"].read_text(), "docs", 128, options, out)
    assert transformers_perplexity(out, windows, "causal") == pytest.approx(composite["perplexity"], rel=1e-6)


def test_a_converted_composite_is_evaluated_in_the_dtype_it_is_written_in(merged):
    root = merged["root"]
    result = examples_merge(
        root, "half", dtype="float16", evaluate={"texts": [str(TEXTS["legal"])]}, selection={"granularity": "tensor"}
    ).ok()
    [composite] = [r for r in result["evaluation"]["rows"] if r["role"] == "composite"]
    out = Path(result["output_dir"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    options = EvaluateOptions((TEXTS["legal"],), (str(TEXTS["legal"]),))
    windows = text_windows(tokenizer, "causal", TEXTS["legal"].read_text(), "legal", 128, options, out)
    assert transformers_perplexity(out, windows, "causal") == pytest.approx(composite["perplexity"], rel=1e-6)


def test_a_strategy_that_sets_the_metric_does_not_inherit_the_configs_goal(tmp_path):
    config = config_of(
        MODELS,
        tmp_path / "out",
        selection={"metric": "alpha", "goal": "target", "target": 2.0},
        tether={"mode": "blend", "weights": "compatibility"},
        evaluate={
            "texts": [str(TEXTS["code"])],
            "strategies": [
                {"selection": {"metric": "ner"}, "tether": {"mode": "select"}},
                {"selection": {"granularity": "tensor"}},
            ],
        },
    )
    first, second = config.evaluate.strategies
    assert (first.selection.metric, first.selection.goal, first.selection.target) == ("ner", "max", None)
    assert (first.tether.mode, first.tether.weights) == ("select", "equal")
    assert first.name == "selection.metric: ner, tether.mode: select"
    assert (second.selection.metric, second.selection.goal, second.selection.target) == ("alpha", "target", 2.0)
    assert (second.selection.granularity, second.tether.mode, second.tether.weights) == (
        "tensor",
        "blend",
        "compatibility",
    )
