"""The model card: the README.md of every output, ready for the Hugging Face hub.

Its front matter is the hub's model-card metadata (huggingface.co/docs/hub/model-cards):
- base_model: the hub repo ids of the candidates (the base among them), without revisions, once
  each. A candidate read from a local directory names no repo and is left out; with no candidate
  from the hub, base_model and base_model_relation are left out.
- base_model_relation: merge (an expansion of one model too: it is built from the model's own
  blocks, as a mergekit passthrough merge is, not trained).
- library_name: transformers, or sentence-transformers when the base has a modules.json (the
  output loads in both; the hub shows what the library says).
- license (with license_name and license_link, for `other`): the base's, as its own model card's
  front matter declares it, the one place the hub reads a license from; a hub base's card is taken
  from its snapshot, else downloaded (a few KB; from the local cache when offline). Left out when
  the base has no card, or its card declares none.
- tags: merge, mastermerge.

The body says what the output was made from, the choice at every depth, the tethers, the
expansion, the evaluation and the figures that were drawn.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import __version__
from .plan import Evaluation, Expansion, Plan
from .report import (
    choice_rows,
    evaluation_header,
    evaluation_rows,
    fmt_score,
    importance_line,
    parameter_line,
    selection_sentence,
    tether_line,
    tether_rows,
)
from .select import rule_of
from .sidefiles import MODULES

CARD = "README.md"
LICENSE_KEYS = ("license", "license_name", "license_link")
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
HEATMAP_CAPTION = (
    "In the score heatmap each cell gives a candidate's score over its difference from the winner at that "
    "depth (0: the winner, negative: behind it), and the colour is that difference, what decided the depth. "
    "Red boxes: what supplies each block."
)
MOST_CARD_BYTES = 2**20  # a base's card is read this far at most (its front matter comes first)


def card_metadata(plan: Plan) -> dict:
    """The front matter's keys, in the order written."""
    hub = hub_ids(plan)
    metadata: dict = {"base_model": hub, "base_model_relation": "merge"} if hub else {}
    library = "sentence-transformers" if (plan.sources[plan.base] / MODULES).is_file() else "transformers"
    metadata["library_name"] = library
    metadata.update(base_license(plan))
    metadata["tags"] = ["merge", "mastermerge"]
    return metadata


def hub_ids(plan: Plan) -> list[str]:
    """The repo id of every candidate that came from the hub (it has a revision), once each, in order."""
    return list(dict.fromkeys(c.split("@")[0] for c in plan.candidates if plan.revisions[c]))


def base_license(plan: Plan) -> dict[str, str]:
    """license, license_name and license_link of the base's own card, those it declares as one-line
    strings; empty without a card."""
    card = base_card(plan)
    metadata = front_matter_of(card) if card is not None else {}
    return {
        key: metadata[key]
        for key in LICENSE_KEYS
        if isinstance(metadata.get(key), str) and metadata[key].strip() and "\n" not in metadata[key]
    }


def base_card(plan: Plan) -> Path | None:
    """The base's README.md: in its directory, else (a hub base) from the hub at its revision."""
    local = plan.sources[plan.base] / CARD
    if local.is_file():
        return local
    revision = plan.revisions[plan.base]
    return hub_card(plan.base.split("@")[0], revision) if revision else None


def hub_card(repo_id: str, revision: str) -> Path | None:
    """The repo's README.md at that revision, from the local cache or downloaded; None when the repo
    has none or it cannot be had (offline and not cached, the hub unreachable)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, CARD, revision=revision))
    except Exception:  # any reason alike: the license is left out, the card written without it
        return None


def front_matter_of(path: Path) -> dict:
    """The YAML front matter of a model card as a dict; empty when it has none or it is not a YAML
    mapping (the card is the base's: anything may be in it)."""
    with open(path, "rb") as handle:
        text = handle.read(MOST_CARD_BYTES).decode("utf-8", errors="replace")
    found = FRONT_MATTER.match(text)
    if found is None:
        return {}
    try:
        metadata = yaml.safe_load(found.group(1))
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def model_card(
    plan: Plan, heatmaps: list[str] | None = None, curve: str | None = None, figure: str | None = None
) -> str:
    """README.md of the output: what it was made from, the choice at every depth, the tethers, the
    expansion, the evaluation, and the figures that were drawn (`heatmaps`: the score's, then the
    compatibility's; `figure`: the perplexities)."""
    front = "---\n" + yaml.safe_dump(card_metadata(plan), sort_keys=False, allow_unicode=True) + "---\n"
    body = (
        merge_section(plan, heatmaps or [])
        if len(plan.candidates) > 1
        else f"""# Expanded model

Made by mastermerge {__version__} from `{plan.base}` by duplicating its most important blocks (DLEC).
"""
    )
    if plan.expansion is not None:
        body += "\n" + expansion_section(plan.expansion, curve)
    if plan.evaluation is not None:
        body += "\n" + evaluation_section(plan.evaluation, figure)
    if plan.notes:
        body += "\n## Notes\n" + "".join(f"\n- {note}" for note in plan.notes) + "\n"
    return front + body + "\nEvery metric and every tensor's source are in merge_report.json.\n"


def merge_section(plan: Plan, heatmaps: list[str]) -> str:
    rows = choice_rows(plan)
    models = "\n".join(f"- `{c}`" + candidate_marks(plan, c) for c in plan.candidates)
    images = " ".join(f"![{Path(h).stem.replace('_', ' ')}]({h})" for h in heatmaps)
    figures = f"\n{images}\n\n{HEATMAP_CAPTION}\n" if heatmaps else ""
    blend = plan.tethers is not None and plan.tethers.options.mode == "blend"
    how = (
        "the candidates whose blocks are still compatible with the base's are averaged"
        if blend
        else "the candidate whose weight matrices score best supplies the block"
    )
    return f"""# Composite model

Made by mastermerge {__version__}: at every depth, {how}. {selection_sentence(plan.selection)}
Granularity: {plan.selection.granularity}.

Candidates (ties go to the earlier one):
{models}
{warning_lines(plan.warnings)}
Scores are the {rule_of(plan.selection).label} over the matrices of each group; the {
        "blend (each candidate's weight given)" if blend else "winner"
    } supplies its tensors.

{markdown_table(rows)}
{figures}
{tether_section(plan) if plan.tethers is not None else ""}"""


def candidate_marks(plan: Plan, candidate: str) -> str:
    """' (base, local)', ' (local)', ' (base)' or nothing: what the card says beside a candidate."""
    marks = ["base"] * (candidate == plan.base) + ["local"] * (plan.revisions[candidate] is None)
    return f" ({', '.join(marks)})" if marks else ""


def evaluation_section(evaluation: Evaluation, figure: str | None) -> str:
    image = f"\n![perplexity by model and text]({figure})\n" if figure else ""
    header = evaluation_header(evaluation)
    return f"""## Evaluation

{header[0].upper() + header[1:]}.
{warning_lines(evaluation.warnings)}
{markdown_table(evaluation_rows(evaluation))}

{evaluation.reason}
{image}"""


def tether_section(plan: Plan) -> str:
    return f"""## Tethers (compatibility with the base)

{tether_line(plan.tethers).removeprefix("tethers: ").capitalize()}.
{warning_lines(plan.tethers.warnings)}
{markdown_table(tether_rows(plan))}
"""


def warning_lines(warnings: list[str]) -> str:
    """Each warning as a bold-labelled paragraph of the card."""
    return "".join(f"\n**Warning:** {w}\n" for w in warnings)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def expansion_section(expansion: Expansion, curve: str | None) -> str:
    rows = "\n".join(f"| {a.source} | {a.depth} | {fmt_score(a.score)} |" for a in expansion.added)
    init = (
        "`identity`: each copy's residual-writing projections are zero, so the expanded model computes "
        "the same function as before and can be fine-tuned from there"
        if expansion.init == "identity"
        else "`copy`: each copy is an exact duplicate of its source block"
    )
    curve = f"\n![importance by depth]({curve})\n" if curve else ""
    note = f" ({expansion.note})" if expansion.note else ""
    return f"""## Layer expansion (DLEC)

{parameter_line(expansion)}; {len(expansion.added)} block(s) added, each right after its source.
Importance: {importance_line(expansion)}.{note}
Initialisation: {init}.

| copied block | new depth | importance |
|---|---|---|
{rows}
{curve}"""
