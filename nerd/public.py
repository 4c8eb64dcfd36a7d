"""The names an output gives what the merge read, so that it holds no path of the machine that merged.

The model card (README.md) and merge_report.json name a hub model by its reference as the config
gives it (`org/name`, `org/name@rev`) and a local model by its directory's name (its label in
the tables, `short_names`: more of its path where two share a name, never the path from the root); a
text file (the calibration text, an evaluation's texts) likewise by its file name; a path the
config gives from the root (the output directory, a text) by its last part. `public_names` maps
every way the merge refers to them (as the config wrote them, and resolved to the directories and
files read) to that name; `Names.text` rewrites a text with it and `Names.applied` every key and
string of a report. The report's inputs section is the one place that holds a local model's
directory (`local`); mergekit_config.yml keeps the paths mergekit needs to find the models
(recipe.py), and the figures label the models with short_names, which names no path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import PurePath

from .config import MergeConfig
from .plan import Plan, short_names


@dataclass(frozen=True)
class Names:
    """Each reference or path of the merge's inputs that the output names otherwise, and that name."""

    renamed: dict[str, str]
    pattern: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # one pass, the longest first: a path is never taken for a shorter one it begins with, and
        # a name written in is not renamed again
        longest = sorted(self.renamed, key=len, reverse=True)
        object.__setattr__(self, "pattern", re.compile("|".join(map(re.escape, longest))) if longest else None)

    def text(self, text: str) -> str:
        """The text with every reference and path of `renamed` in it replaced by its name."""
        return text if self.pattern is None else self.pattern.sub(lambda found: self.renamed[found.group()], text)

    def applied(self, value, paths: bool = False):
        """A JSON value (dicts, lists, strings, numbers) with `text` applied to every key and string;
        with `paths`, a string that is a path from the root (what a config gives) becomes its last part."""
        if isinstance(value, dict):
            return {self.applied(k, paths): self.applied(v, paths) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.applied(v, paths) for v in value]
        if not isinstance(value, str):
            return value
        text = self.text(value)
        return PurePath(text).name or text if paths and os.path.isabs(text) else text


def model_names(plan: Plan) -> dict[str, str]:
    """Each candidate's name in the output: a hub model's reference as it is (it has a revision), a
    local model's directory name (short_names)."""
    labels = short_names(plan.candidates)
    return {c: c if plan.revisions[c] else labels[c] for c in plan.candidates}


def public_names(plan: Plan, config: MergeConfig) -> Names:
    """The Names of a merge: every candidate as the config names it and its directory (a hub
    model's snapshot too) by its model name; every text file, as written and resolved, by its
    label; the config file by its name."""
    renamed = {}
    for candidate, name in model_names(plan).items():
        renamed |= {candidate: name, str(plan.sources[candidate]): name}
    written = list(config.evaluate.names) if config.evaluate is not None else []
    resolved = [str(t) for t in config.evaluate.texts] if config.evaluate is not None else []
    if config.dlec is not None and config.dlec.calibration is not None:
        written.append(str(config.dlec.calibration))
        resolved.append(str(config.dlec.calibration))
    labels = short_names(written)
    renamed |= {path: labels[name] for name, path in zip(written, resolved)} | labels
    if config.source is not None:
        renamed[str(config.source)] = config.source.name
    return Names({old: new for old, new in renamed.items() if old != new})
