"""train.sft's data path: rows (train/sft/rows.py), tokens and loss masks (train/sft/tokens.py); its batches and
packing are tested in tests/test_sft_batches.py.

Independent references: the fixture files read by eye and the chat template's own strings
(`tokenizer.apply_chat_template`, computed here) for the trained spans.
"""

import json
import shutil

import numpy as np
import pytest

from mtlora_jax import models
from train.sft import rows as rows_lib
from train.sft import tokens

ALPACA_LIBRE_LINES, ALPACA_LIBRE_NOT_JSON, ALPACA_LIBRE_EMPTY = 2294, 14, 51


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# Rows ------------------------------------------------------------------------------------------------------------


def test_each_fixture_format_is_detected_and_parsed(sft_dir):
    chat = rows_lib.load(sft_dir / "chat.jsonl")
    assert chat.formats == {str(sft_dir / "chat.jsonl"): "chat"} and chat.skipped == {}
    assert len(chat.rows) == 8 and {r.fmt for r in chat.rows} == {"chat"}
    assert chat.rows[0].messages == (("user", "What is the capital of France?"), ("assistant", "Paris."))
    assert chat.rows[0].where == f"{sft_dir / 'chat.jsonl'}:1" and chat.rows[0].prompt is None
    # a top-level "system" becomes the first turn; an explicit system turn stays where it is
    assert chat.rows[2].messages == (("system", "You answer in one word."), ("user", "Opposite of hot?"),
                                     ("assistant", "Cold."))  # fmt: skip
    assert [r for r, _ in chat.rows[3].messages] == ["system", "user", "assistant", "user", "assistant"]

    alpaca = rows_lib.load(sft_dir / "alpaca.jsonl")
    assert list(alpaca.formats.values()) == ["alpaca"] and len(alpaca.rows) == 4
    assert alpaca.rows[0].messages == (("user", "Give a synonym of happy."), ("assistant", "Joyful."))  # input ""
    assert alpaca.rows[1].messages == (("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour."))
    assert alpaca.rows[2].messages[0] == ("user", "Sum the numbers.\n\n3, 4")
    # "status" and "other" (Alpaca Libre's extra keys) are ignored
    assert alpaca.rows[3].messages == (("user", "Name a fruit."), ("assistant", "Apple."))

    prompt = rows_lib.load(sft_dir / "prompt.json")  # a JSON array: "line" is the row's position
    assert list(prompt.formats.values()) == ["prompt"]
    assert [(r.prompt, r.completion, r.messages) for r in prompt.rows] == [
        ("Q: 1 + 1 =", " 2", None), ("Q: 2 + 3 =", " 5", None), ("Q: 4 + 4 =", " 8", None)
    ]  # fmt: skip
    assert [r.where for r in prompt.rows] == [f"{sft_dir / 'prompt.json'}:{i}" for i in (1, 2, 3)]

    text = rows_lib.load(sft_dir / "text.jsonl")
    assert list(text.formats.values()) == ["text"]
    assert [(r.prompt, r.completion) for r in text.rows] == [
        ("", "The quick brown fox jumps over the lazy dog."), ("", "A stitch in time saves nine."),
        ("", "All that glitters is not gold."),
    ]  # fmt: skip


def test_a_folder_loads_its_data_files_in_name_order(sft_dir, tmp_path):
    for name in ("text.jsonl", "alpaca.jsonl", "prompt.json", "chat.jsonl"):
        shutil.copy(sft_dir / name, tmp_path / name)
    (tmp_path / "README.txt").write_text("not data")
    (tmp_path / "sub").mkdir()
    loaded = rows_lib.load(tmp_path)
    names = ["alpaca.jsonl", "chat.jsonl", "prompt.json", "text.jsonl"]
    assert loaded.formats == {
        str(tmp_path / n): f for n, f in zip(names, ["alpaca", "chat", "prompt", "text"], strict=True)
    }
    assert [r.fmt for r in loaded.rows] == ["alpaca"] * 4 + ["chat"] * 8 + ["prompt"] * 3 + ["text"] * 3
    assert loaded.rows[4].where == f"{tmp_path / 'chat.jsonl'}:1"
    with pytest.raises(FileNotFoundError, match="without .jsonl or .json files"):
        rows_lib.load(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        rows_lib.load(tmp_path / "nowhere.jsonl")


def test_a_row_of_another_format_names_file_line_and_its_keys(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}),
        json.dumps({"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."}]}),
        json.dumps({"prompt": "Q", "completion": "A", "id": 7}),
    ])  # fmt: skip
    with pytest.raises(rows_lib.RowError) as e:
        rows_lib.load(path)
    msg = str(e.value)
    assert f"{path}:3: not a chat row" in msg and "it has: prompt, completion, id" in msg
    assert "1 invalid row: 1 of another format" in msg and "skip_bad_rows" in msg
    loaded = rows_lib.load(path, skip_bad_rows=True)
    assert len(loaded.rows) == 2 and loaded.skipped == {"of another format": 1}


def test_bad_rows_are_one_error_counted_by_cause_or_skipped(tmp_path):
    good = lambda i: json.dumps({"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}."})
    path = _write(tmp_path / "alpaca.jsonl", [
        good(1),
        '{"instruction": "Broken", "output": "x"',  # line 2: not JSON
        json.dumps({"instruction": "Empty answer.", "output": "  "}),  # line 3: empty field
        good(4),
        "",  # line 5: a blank line is no row
        "{not json}",  # line 6
        json.dumps({"instruction": "", "input": "x", "output": "y"}),  # line 7: empty instruction
        good(8),
    ])  # fmt: skip
    with pytest.raises(rows_lib.RowError) as e:
        rows_lib.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 4 invalid rows: ")
    assert f"2 not valid JSON (first: {path}:2: not valid JSON" in msg
    assert f"2 with an empty field (first: {path}:3: 'output' is empty)" in msg
    loaded = rows_lib.load(path, skip_bad_rows=True)
    assert [r.messages[0][1] for r in loaded.rows] == ["Task 1.", "Task 4.", "Task 8."]
    assert [r.where for r in loaded.rows] == [f"{path}:{n}" for n in (1, 4, 8)]
    assert loaded.skipped == {"not valid JSON": 2, "with an empty field": 2}

    chat = _write(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}),
        json.dumps({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}),
    ])  # fmt: skip
    with pytest.raises(rows_lib.RowError) as e:
        rows_lib.load(chat)
    assert (f"1 without an assistant turn (first: {chat}:2: a chat without an assistant turn (roles: system, user))"
            in str(e.value))  # fmt: skip
    assert rows_lib.load(chat, skip_bad_rows=True).skipped == {"without an assistant turn": 1}


def test_empty_files_and_files_without_a_valid_row_are_errors(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(rows_lib.RowError, match=r"empty\.jsonl: empty file|blank\.jsonl: empty file"):
            rows_lib.load(tmp_path / name, skip_bad_rows=True)
    path = _write(tmp_path / "keys.jsonl", [json.dumps({"question": "?", "answer": "!"})])
    with pytest.raises(rows_lib.RowError, match=r"keys\.jsonl:1: no row in a known format .* it has: question, answer"):
        rows_lib.load(path)
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "  "}), "[1, 2"])
    with pytest.raises(rows_lib.RowError, match=r"bad\.jsonl: no valid row"):
        rows_lib.load(path, skip_bad_rows=True)


@pytest.mark.data
def test_alpaca_libre_has_14_rows_that_are_not_json(shared_data):
    """The real file: 2,294 lines, 14 not valid JSON (the first at line 2279), 51 with an empty output or
    instruction (counted here with json and str.strip), the rest loads."""
    path = shared_data / "sft" / "alpaca_libre_v2.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    bad, empty = [], []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(n)
            continue
        if not obj["instruction"].strip() or not obj["output"].strip():
            empty.append(n)
    assert (len(lines), len(bad), len(empty)) == (ALPACA_LIBRE_LINES, ALPACA_LIBRE_NOT_JSON, ALPACA_LIBRE_EMPTY)
    assert bad[0] == 2279
    with pytest.raises(rows_lib.RowError) as e:
        rows_lib.load(path)
    assert f"14 not valid JSON (first: {path}:2279: not valid JSON" in str(e.value)
    assert f"51 with an empty field (first: {path}:{empty[0]}:" in str(e.value)
    loaded = rows_lib.load(path, skip_bad_rows=True)
    assert loaded.skipped == {"not valid JSON": 14, "with an empty field": 51}
    assert len(loaded.rows) == ALPACA_LIBRE_LINES - 14 - 51 == 2229
    assert {r.fmt for r in loaded.rows} == {"alpaca"}
    kept = [int(r.where.rsplit(":", 1)[1]) for r in loaded.rows]
    assert kept == [n for n in range(1, len(lines) + 1) if n not in set(bad) | set(empty)]


# Tokens ----------------------------------------------------------------------------------------------------------


def _template(tok, messages, generation_prompt=False):
    turns = [{"role": r, "content": c} for r, c in messages]
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def _spans(enc):
    """The (start, stop) runs of trained tokens."""
    t = np.concatenate([[False], enc.targets, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(t))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_single_turn_chat_trains_on_the_answer_and_end_of_turn(llama_tok, sft_dir):
    row = rows_lib.load(sft_dir / "chat.jsonl").rows[0]
    enc = tokens.encode(llama_tok, row)
    full = _template(llama_tok, row.messages)
    prefix = _template(llama_tok, row.messages[:1], generation_prompt=True)
    assert full[len(prefix) :] == "Paris.<|im_end|>\n"  # SmolLM2's ChatML: the answer, then its end of turn
    assert enc.tokens.dtype == np.int32 and enc.targets.dtype == bool and len(enc.tokens) == len(enc.targets)
    assert llama_tok.decode(enc.tokens) == full
    assert llama_tok.decode(enc.tokens[enc.targets]) == full[len(prefix) :]
    assert llama_tok.decode(enc.tokens[~enc.targets]) == prefix
    assert len(_spans(enc)) == 1 and enc.targets[-3:].all() and not enc.targets[0]


def test_multi_turn_chat_trains_both_answers_and_no_user_or_system_token(llama_tok, sft_dir):
    row = rows_lib.load(sft_dir / "chat.jsonl").rows[3]  # system, user, assistant "4.", user, assistant "6."
    enc = tokens.encode(llama_tok, row)
    full = _template(llama_tok, row.messages)
    want = []
    for i in (2, 4):
        start = len(_template(llama_tok, row.messages[:i], generation_prompt=True))
        want.append(full[start : len(_template(llama_tok, row.messages[: i + 1]))])
    assert want == ["4.<|im_end|>\n", "6.<|im_end|>\n"]
    assert [llama_tok.decode(enc.tokens[a:b]) for a, b in _spans(enc)] == want
    untrained = llama_tok.decode(enc.tokens[~enc.targets])
    for text in ("You are terse.", "2 + 2?", "And 3 + 3?", "<|im_start|>user", "<|im_start|>assistant"):
        assert text in untrained
    assert llama_tok.decode(enc.tokens) == full


def test_a_chat_opened_by_the_assistant_trains_on_its_answer_only(llama_tok):
    """The template's default system prompt and turn header before a first assistant turn are not trained on."""
    row = rows_lib.Row((("assistant", "Hello."), ("user", "Hi"), ("assistant", "Bye.")), None, None, "x:1", "chat")
    enc = tokens.encode(llama_tok, row)
    assert [llama_tok.decode(enc.tokens[a:b]) for a, b in _spans(enc)] == ["Hello.<|im_end|>\n", "Bye.<|im_end|>\n"]
    assert "You are a helpful AI assistant" in llama_tok.decode(enc.tokens[~enc.targets])


def test_prompt_completion_trains_on_completion_and_eos_and_text_on_every_token(llama_tok, sft_dir):
    eos = llama_tok.eos_token_id
    row = rows_lib.load(sft_dir / "prompt.json").rows[0]
    enc = tokens.encode(llama_tok, row)
    prompt_ids = llama_tok("Q: 1 + 1 =")["input_ids"]  # with the tokenizer's own special tokens (none here)
    assert enc.tokens[: len(prompt_ids)].tolist() == prompt_ids and not enc.targets[: len(prompt_ids)].any()
    assert enc.targets[len(prompt_ids) :].all() and enc.tokens[-1] == eos
    assert llama_tok.decode(enc.tokens[enc.targets]) == " 2" + llama_tok.eos_token

    row = rows_lib.load(sft_dir / "text.jsonl").rows[1]
    enc = tokens.encode(llama_tok, row)
    assert enc.targets.all() and enc.tokens[-1] == eos
    assert llama_tok.decode(enc.tokens) == "A stitch in time saves nine." + llama_tok.eos_token


def test_chat_rows_need_a_chat_template_and_alpaca_falls_back_to_its_prompt(tiny_gpt2, sft_dir):
    from train import chat

    tok = models.load_tokenizer(tiny_gpt2)
    assert not getattr(tok, "chat_template", None)
    row = rows_lib.load(sft_dir / "chat.jsonl").rows[4]
    with pytest.raises(ValueError, match=rf"{row.where}: a chat row, but the model's tokenizer has no chat template"):
        tokens.encode(tok, row)
    row = rows_lib.load(sft_dir / "alpaca.jsonl").rows[1]
    enc = tokens.encode(tok, row)
    prompt = chat.ALPACA_PROMPT.format(instruction="Translate to French.\n\nGood morning")
    assert prompt.endswith("### Response:\n") and tok.decode(enc.tokens[~enc.targets]) == prompt
    assert tok.decode(enc.tokens[enc.targets]) == "Bonjour.<|endoftext|>"


def test_truncation_to_max_length_plus_one_is_counted(llama_tok, sft_dir):
    rows = rows_lib.load(sft_dir / "chat.jsonl").rows
    full = [tokens.encode(llama_tok, r) for r in rows]
    n = np.array([len(e.tokens) for e in full])
    max_length = int(np.median(n))  # about half the rows are longer than max_length + 1
    cut, counts = tokens.encode_all(llama_tok, rows, max_length)
    assert counts["truncated"] == int((n > max_length + 1).sum()) > 0
    for e, f in zip(cut, full, strict=True):
        k = min(len(f.tokens), max_length + 1)
        np.testing.assert_array_equal(e.tokens, f.tokens[:k])
        np.testing.assert_array_equal(e.targets, f.targets[:k])
    lost = sum(1 for f in full if len(f.tokens) > max_length + 1 and not f.targets[1 : max_length + 1].any())
    assert counts["truncated_no_target"] == lost
    # a cut that leaves no trained token at all is counted as such
    _, counts = tokens.encode_all(llama_tok, rows, 8)
    assert counts == {"truncated": 8, "truncated_no_target": 8}
