"""Table-to-text data (E2E, WebNLG 2017, DART) in the LoRA repository's formats, and its LM batches (train/lm.py).

Linearization follows LoRA's examples/NLG/src/format_converting_*.py: E2E keeps the meaning representation
string (`name : The Vaults | Type : pub | ...`); WebNLG and DART join `subject : property : object` triples with
` | ` (DART lower-cases the property; WebNLG keeps only lexicalisations whose comment is "good"). A training
sequence is, as in LoRA's gpt2_encode.py,

    prefix + encode(context) + separator + encode(" " + target) + [eos]

with GPT-2's <|endoftext|> as separator and eos; the loss covers the target and eos tokens only, with label
smoothing eps: loss = (1 - eps) * nll + eps * mean_v(-log p_v), averaged over target tokens.

At evaluation every input table is decoded once; all references of that table form its reference set (E2E
groups lines by their meaning representation; WebNLG and DART by entry). WebNLG test categories are "seen"
when they occur in train.json (the 10 categories of WEBNLG_SEEN_CATEGORIES).
"""

import dataclasses
import json
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

import numpy as np

# Files of each task under --config.data_dir, named as in the LoRA repository (examples/NLG/data/).
FILES = {
    "e2e": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
    "webnlg": {"train": "train.json", "valid": "dev.json", "test": "test.json"},
    "dart": {s: f"dart-v1.1.1-full-{f}.json" for s, f in (("train", "train"), ("valid", "dev"), ("test", "test"))},
}
# Sub-folders of LoRA's data/ folder, also searched under data_dir.
SUBDIRS = {"e2e": "e2e", "webnlg": "webnlg_challenge_2017", "dart": "dart"}
SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}
# The 10 WebNLG 2017 training categories (documentation; seen_categories() derives them from train.json).
WEBNLG_SEEN_CATEGORIES = frozenset(
    {
        "Airport",
        "Astronaut",
        "Building",
        "City",
        "ComicsCharacter",
        "Food",
        "Monument",
        "SportsTeam",
        "University",
        "WrittenWork",
    }
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One (table, reference) pair. `group` numbers the input tables in file order."""

    context: str
    target: str
    group: int
    category: str = ""


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The distinct inputs of a split, each with all its references."""

    contexts: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]
    categories: tuple[str, ...]


def linearize_triples(triples: Sequence[Sequence[str]], lower_property: bool = False) -> str:
    """`s1 : p1 : o1 | s2 : p2 : o2 ...` from (subject, property, object) triples."""
    return " | ".join(f"{s} : {p.lower() if lower_property else p} : {o}" for s, p, o in triples)


def read_e2e(path: pathlib.Path) -> list[Example]:
    """E2E lines `<meaning representation>||<reference>`; lines with the same MR share a group."""
    groups: dict[str, int] = {}
    out = []
    for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf8").splitlines(), 1):
        if not line.strip():
            continue
        if "||" not in line:
            raise ValueError(f"{path}:{n}: expected '<meaning representation>||<reference>', got {line[:80]!r}")
        mr, target = (part.strip() for part in line.split("||")[:2])
        out.append(Example(mr, target, groups.setdefault(mr, len(groups))))
    return out


def read_webnlg(path: pathlib.Path) -> list[Example]:
    """WebNLG 2017 json {"entries": [{"<id>": {"category", "modifiedtripleset", "lexicalisations"}}]}."""
    entries = json.loads(pathlib.Path(path).read_text(encoding="utf8"))["entries"]
    out = []
    for group, wrapper in enumerate(entries):
        (entry,) = wrapper.values()
        triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
        context = linearize_triples(triples)
        out += [
            Example(context, lex["lex"].strip(), group, entry["category"])
            for lex in entry["lexicalisations"]
            if lex["comment"] == "good"
        ]
    return out


def _dart_entries(path: pathlib.Path):
    """(triples, texts) per entry of DART's json list or official XML."""
    if path.suffix == ".xml":
        for entry in ET.parse(path).getroot().iter("entry"):
            triples = []
            for m in entry.iter("mtriple"):
                parts = [x.strip() for x in (m.text or "").split(" | ")]
                if len(parts) != 3:
                    raise ValueError(f"{path}: <mtriple> {m.text!r} is not 'subject | property | object'")
                triples.append(parts)
            yield triples, [(lex.text or "").strip() for lex in entry.iter("lex")]
    else:
        for entry in json.loads(path.read_text(encoding="utf8")):
            yield entry["tripleset"], [a["text"].strip() for a in entry["annotations"]]


def read_dart(path: pathlib.Path) -> list[Example]:
    """DART json list of {"tripleset", "annotations": [{"source", "text"}]}, or the official XML."""
    return [
        Example(linearize_triples(triples, lower_property=True), text, group)
        for group, (triples, texts) in enumerate(_dart_entries(pathlib.Path(path)))
        for text in texts
    ]


READERS: dict[str, Callable[[pathlib.Path], list[Example]]] = {
    "e2e": read_e2e,
    "webnlg": read_webnlg,
    "dart": read_dart,
}


def split_file(task: str, data_dir: str | pathlib.Path, split: str) -> pathlib.Path:
    """Path of a split's file in data_dir (or data_dir/<LoRA sub-folder>); DART may be .json or .xml."""
    if task not in FILES:
        raise ValueError(f"config.task={task!r}: expected one of {sorted(FILES)}")
    if split not in SPLITS:
        raise ValueError(f"config.eval_split={split!r}: expected one of {sorted(SPLITS)}")
    name = FILES[task][SPLITS[split]]
    names = [name, name[: -len(".json")] + ".xml"] if task == "dart" else [name]
    tried = [pathlib.Path(data_dir, sub, n) for sub in ("", SUBDIRS[task]) for n in names]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"config.data_dir={data_dir}: no {task} {split} file; tried {[str(p) for p in tried]}")


def load_split(task: str, data_dir: str | pathlib.Path, split: str) -> list[Example]:
    """Examples of one split, e.g. load_split("webnlg", "../shared/data/nlg", "test").

    Raises:
      FileNotFoundError: no file for the split (the message lists the paths tried).
      ValueError: a file that does not parse, or holds no examples (the message names the file and data_dir).
    """
    path = split_file(task, data_dir, split)
    try:
        examples = READERS[task](path)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, ET.ParseError) as e:
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: not a {task} {split} file ({why}); config.data_dir={data_dir}") from e
    if not examples:
        raise ValueError(f"{path}: no examples; config.data_dir={data_dir}")
    return examples


def group_references(examples: Sequence[Example], max_inputs: int | None = None) -> EvalSet:
    """Distinct inputs in file order with their reference lists; keep the first max_inputs inputs."""
    order: dict[int, int] = {}
    contexts, refs, cats = [], [], []
    for ex in examples:
        if ex.group not in order:
            if max_inputs is not None and len(order) >= max_inputs:
                continue
            order[ex.group] = len(order)
            contexts.append(ex.context)
            refs.append([])
            cats.append(ex.category)
        refs[order[ex.group]].append(ex.target)
    return EvalSet(tuple(contexts), tuple(tuple(r) for r in refs), tuple(cats))


def seen_categories(train: Sequence[Example]) -> frozenset[str]:
    """Categories present in the training examples (WebNLG's "seen" test categories)."""
    return frozenset(ex.category for ex in train)


@dataclasses.dataclass(frozen=True)
class TokenFormat:
    """Special tokens of the sequence layout (module docstring) for one tokenizer."""

    prefix: tuple[int, ...]  # before the context (a BOS distinct from eos, e.g. Llama's <s>)
    separator: tuple[int, ...]  # between context and target (LoRA: GPT-2's <|endoftext|>)
    eos_id: int  # appended to every target
    pad_id: int
    stop_ids: tuple[int, ...]  # tokens that end decoding: eos, and "\n\n" when it is one token (LoRA's 628)


def token_format(tokenizer) -> TokenFormat:
    """TokenFormat of a Hugging Face tokenizer: separator = eos as in LoRA; pad falls back to eos."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; NLG needs one")
    newline = tokenizer.encode("\n\n", add_special_tokens=False)
    return TokenFormat(
        prefix=(bos,) if bos is not None and bos != eos else (),
        separator=(eos,),
        eos_id=eos,
        pad_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        stop_ids=(eos, *newline) if len(newline) == 1 else (eos,),
    )


def encode_prompt(
    encode: Callable[[str], list[int]], context: str, *, separator: Sequence[int], prefix: Sequence[int] = ()
) -> list[int]:
    """prefix + encode(context) + separator: the tokens the model continues from."""
    return [*prefix, *encode(context), *separator]


def encode_example(
    encode: Callable[[str], list[int]],
    context: str,
    target: str,
    *,
    separator: Sequence[int],
    eos_id: int,
    prefix: Sequence[int] = (),
) -> tuple[list[int], int]:
    """(tokens, n_context): prompt + encode(" " + target) + [eos]; the first n_context tokens get no loss."""
    prompt = encode_prompt(encode, context, separator=separator, prefix=prefix)
    return prompt + [*encode(" " + target), eos_id], len(prompt)


def make_lm_batch(encoded: Sequence[tuple[list[int], int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded next-token batch from encode_example outputs; longer sequences keep their start.

    Returns:
      input_ids, labels, weights, attention_mask: [b, seq_len]; labels[j] = tokens[j + 1]; weights are 1
      where labels[j] is a target or eos token.
    """
    b = len(encoded)
    batch = {k: np.zeros((b, seq_len), np.int32) for k in ("input_ids", "labels", "attention_mask")}
    batch["input_ids"][:], batch["labels"][:] = pad_id, pad_id
    weights = np.zeros((b, seq_len), np.float32)
    for r, (tokens, n_context) in enumerate(encoded):
        n = min(len(tokens) - 1, seq_len)
        batch["input_ids"][r, :n] = tokens[:n]
        batch["labels"][r, :n] = tokens[1 : n + 1]
        batch["attention_mask"][r, :n] = 1
        weights[r, max(n_context - 1, 0) : n] = 1.0  # labels[j] = tokens[j+1] is a target when j+1 >= n_context
    return {**batch, "weights": weights}


def make_prompt_batch(prompts: Sequence[list[int]], prompt_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [b, prompt_len] and their mask; longer prompts keep their last prompt_len tokens."""
    ids = np.full((len(prompts), prompt_len), pad_id, np.int32)
    mask = np.zeros((len(prompts), prompt_len), np.int32)
    for r, p in enumerate(prompts):
        p = p[-prompt_len:]
        ids[r, prompt_len - len(p) :], mask[r, prompt_len - len(p) :] = p, 1
    return ids, mask
