"""The tokenizer files of a model directory, checked as transformers' AutoTokenizer would read them
(`mastermerge verify`, check_tokenizer):

- each file present parses: tokenizer.json as JSON and with the `tokenizers` library where it is
  installed (the fast tokenizer transformers builds from it); tokenizer_config.json,
  special_tokens_map.json, added_tokens.json and vocab.json as JSON objects (vocab.json and
  added_tokens.json of token -> integer id); vocab.txt and merges.txt as UTF-8 text, and
  merges.txt with vocab.json as a BPE model where `tokenizers` is installed;
- a tokenizer the directory describes can be built: without tokenizer.json, a tokenizer_class that
  loads from it alone (PreTrainedTokenizerFast, transformers 5's TokenizersBackend) is a problem,
  and so are tokenizer settings with no vocabulary at all (vocab.txt, vocab.json, a sentencepiece
  .model or .spm, a .tiktoken file) to build a tokenizer from, unless the tokenizer is custom
  code (auto_map);
- every token id of each file (the vocabulary and the added tokens) is below the row count of the
  model's token embedding (the family's word_embedding, architecture.py), so no token the
  tokenizer produces indexes past it; and so are the ids of the special tokens that
  tokenizer_config.json or special_tokens_map.json name but the vocabulary lacks, which
  transformers adds after it (a tokenizer class's own default special tokens are not in the
  files, and not counted).

A directory with no tokenizer files at all is fine: many checkpoints ship none. Each problem is one
line naming the file; the result says which files were read and the largest token id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .architecture import Architecture
from .checkpoint import TensorInfo
from .consistency import Problem, names, read_config
from .errors import first_line

TOKENIZER_JSON = "tokenizer.json"
SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")  # JSON objects
VOCABULARIES = ("vocab.json", "vocab.txt", "merges.txt")  # a slow tokenizer's files that are parsed
OTHER_VOCABULARIES = (".model", ".spm", ".tiktoken")  # sentencepiece and tiktoken files: present, not parsed
FAST_ONLY = ("PreTrainedTokenizerFast", "TokenizersBackend")  # tokenizer classes built from tokenizer.json alone


@dataclass
class TokenizerFiles:
    """What check_tokenizer read: the tokenizer files, the largest token id among them (None: no
    ids read), and the token embedding's rows and name (None: no one token embedding)."""

    files: list[str] = field(default_factory=list)
    largest_id: int | None = None
    rows: int | None = None
    embedding: str | None = None

    def summary(self) -> str:
        if not self.files:
            return "no tokenizer files"
        largest = "" if self.largest_id is None else f", largest token id {self.largest_id}"
        rows = f" < {self.rows} embedding rows" if largest and self.rows is not None else ""
        return f"tokenizer files ({', '.join(self.files)}) parse{largest}{rows}"

    def to_dict(self) -> dict:
        return {"files": self.files, "largest_id": self.largest_id, "embedding_rows": self.rows}


def check_tokenizer(
    directory: Path, headers: dict[str, list[TensorInfo]], architecture: Architecture
) -> tuple[list[Problem], TokenizerFiles]:
    """The tokenizer files of the directory (see the module docstring): their problems, and what was read."""
    result = TokenizerFiles(files=tokenizer_files(directory))
    problems, ids, settings = [], {}, {}  # ids: file -> every token id it gives (id -> token)
    for name in result.files:
        path = directory / name
        if name.endswith(OTHER_VOCABULARIES):
            continue
        try:
            ids[name], settings[name] = ids_of(path, directory)
        except ValueError as exc:
            problems.append(Problem(path, str(exc)))
    problems += buildable(directory, result.files, settings.get("tokenizer_config.json"))
    result.embedding, result.rows = token_embedding(headers, architecture)
    for name, found in ids.items():
        past = sorted(i for i in found if result.rows is not None and i >= result.rows)
        if past:
            problems.append(
                Problem(
                    directory / name,
                    f"token id {past[-1]} ({found[past[-1]]!r}) is past the {result.rows} rows of "
                    f"'{result.embedding}' ({len(past)} token id(s) of {result.rows} or more)",
                )
            )
    if TOKENIZER_JSON in result.files:  # what transformers loads (nothing is known of one that does not parse)
        loaded = ids.get(TOKENIZER_JSON, {})
    else:
        loaded = {i: t for found in ids.values() for i, t in found.items()}
    added, lacking = added_specials(loaded, settings)
    result.largest_id = max([*loaded, *added.values()], default=None)
    for name, tokens in lacking.items():
        first, last = added[tokens[0]], added[tokens[-1]]
        if result.rows is not None and last >= result.rows:
            ids_text = f"token id {first}" if first == last else f"token ids {first} to {last}"
            problems.append(
                Problem(
                    directory / name,
                    f"names special token(s) {names(tokens)} that the vocabulary lacks: transformers adds "
                    f"them as {ids_text}, past the {result.rows} rows of '{result.embedding}'",
                )
            )
    return problems, result


def added_specials(loaded: dict[int, str], settings: dict) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The special tokens the settings name that the vocabulary lacks, with the ids transformers
    gives them as it adds them after the vocabulary, and the tokens each settings file adds
    (nothing when no vocabulary was read)."""
    vocabulary, added, lacking = set(loaded.values()), {}, {}
    following = max(loaded, default=-1) + 1
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        for token in special_tokens(settings.get(name)) if loaded else ():
            if token not in vocabulary and token not in added:
                added[token], following = following, following + 1
                lacking.setdefault(name, []).append(token)
    return added, lacking


def special_tokens(settings: dict | None) -> list[str]:
    """The special tokens a settings file names: each *_token value and the additional ones, a
    string or an {"content": token} object."""
    if not isinstance(settings, dict):
        return []
    values = [v for k, v in settings.items() if k.endswith("_token")]
    extra = settings.get("additional_special_tokens")
    values += extra if isinstance(extra, list) else []
    found = [v.get("content") if isinstance(v, dict) else v for v in values]
    return list(dict.fromkeys(token for token in found if isinstance(token, str) and token))


def tokenizer_files(directory: Path) -> list[str]:
    """The tokenizer files at the top of a directory, by name."""
    known = (TOKENIZER_JSON, *SETTINGS, *VOCABULARIES)
    return sorted(
        path.name
        for path in directory.iterdir()
        if path.is_file() and (path.name in known or path.name.endswith(OTHER_VOCABULARIES))
    )


def ids_of(path: Path, directory: Path) -> tuple[dict[int, str], dict | None]:
    """The token ids a tokenizer file gives (id -> token) and its JSON object (for settings);
    a ValueError of one line if it does not parse."""
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text ({first_line(exc)})") from None
        if path.name == "merges.txt":
            check_bpe_model(directory)
            return {}, None
        return dict(enumerate(lines[:-1] if lines[-1] == "" else lines)), None  # vocab.txt: a token a line
    data, problem = read_config(path)
    if problem is not None:
        raise ValueError(problem)
    if path.name == TOKENIZER_JSON:
        return tokenizer_json_ids(path, data), None
    if path.name in ("vocab.json", "added_tokens.json"):
        wrong = next(((t, i) for t, i in data.items() if type(i) is not int), None)
        if wrong is not None:
            raise ValueError(f"token {wrong[0]!r} has the id {wrong[1]!r}, expected an integer")
        return {i: t for t, i in data.items()}, None
    if path.name == "tokenizer_config.json":
        return added_token_ids(data.get("added_tokens_decoder")), data
    return {}, data


def tokenizer_json_ids(path: Path, data: dict) -> dict[int, str]:
    """The ids of tokenizer.json's vocabulary and added tokens: read by the tokenizers library
    where it is installed (so a file it cannot load is named), else from the JSON itself."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return json_vocabulary(data)
    try:
        vocabulary = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the library raises a plain Exception for every malformed file
        raise ValueError(f"not a tokenizer the tokenizers library can load ({first_line(exc)})") from None
    return {i: t for t, i in vocabulary.items()}


def json_vocabulary(data: dict) -> dict[int, str]:
    """tokenizer.json's ids without the tokenizers library: model.vocab (token -> id, or Unigram's
    list of [token, score]) and added_tokens ([{id, content}])."""
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        found = {i: t for t, i in vocab.items() if type(i) is int}
    elif isinstance(vocab, list):
        found = {i: e[0] if isinstance(e, list) and e else "" for i, e in enumerate(vocab)}
    else:
        raise ValueError("has no model.vocab: expected a tokenizers serialization with a vocabulary")
    for entry in data.get("added_tokens") or ():
        if isinstance(entry, dict) and type(entry.get("id")) is int:
            found[entry["id"]] = str(entry.get("content"))
    return found


def added_token_ids(decoder: object) -> dict[int, str]:
    """tokenizer_config.json's added_tokens_decoder: {"id": {"content": token, ...}}."""
    if not isinstance(decoder, dict):
        return {}
    found = {}
    for key, entry in decoder.items():
        if not key.isdigit():
            raise ValueError(f"added_tokens_decoder: {key!r} is not a token id")
        found[int(key)] = entry.get("content") if isinstance(entry, dict) else str(entry)
    return found


def check_bpe_model(directory: Path) -> None:
    """merges.txt with vocab.json read as a BPE model where the tokenizers library is installed."""
    vocab = directory / "vocab.json"
    try:
        from tokenizers.models import BPE
    except ImportError:
        return
    if vocab.is_file():
        try:
            BPE.read_file(str(vocab), str(directory / "merges.txt"))
        except Exception as exc:  # as in tokenizer_json_ids
            raise ValueError(f"not a BPE model with vocab.json ({first_line(exc)})") from None


def buildable(directory: Path, files: list[str], config: dict | None) -> list[Problem]:
    """Without tokenizer.json: a tokenizer_class that needs it, or tokenizer settings with no
    vocabulary to build a tokenizer from (custom tokenizer code, auto_map, may read anything)."""
    settings = [name for name in files if name in SETTINGS]
    if TOKENIZER_JSON in files or not settings or (config is not None and "auto_map" in config):
        return []
    path = directory / ("tokenizer_config.json" if "tokenizer_config.json" in settings else settings[0])
    named = config.get("tokenizer_class") if config is not None else None
    if named in FAST_ONLY:
        return [Problem(path, f"tokenizer_class is '{named}', which loads from {TOKENIZER_JSON}, and there is none")]
    if not any(name in VOCABULARIES or name.endswith(OTHER_VOCABULARIES) for name in files):
        which = f"tokenizer_class is {named!r}, but" if named is not None else "describes a tokenizer, but"
        return [
            Problem(
                path,
                f"{which} the directory has no {TOKENIZER_JSON} nor a vocabulary to build one from "
                f"(vocab.txt, vocab.json and merges.txt, tokenizer.model, ...)",
            )
        ]
    return []


def token_embedding(headers: dict[str, list[TensorInfo]], architecture: Architecture) -> tuple[str | None, int | None]:
    """The token embedding (the family's word_embedding) and its rows, when the tensors agree on one row count."""
    found = [
        info
        for infos in headers.values()
        for info in infos
        if architecture.is_word_embedding(info.name) and len(info.shape) == 2
    ]
    if len({info.shape[0] for info in found}) != 1:
        return None, None
    return found[0].name, found[0].shape[0]
