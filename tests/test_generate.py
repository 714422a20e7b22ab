"""Generation: train/generation.py's Generator (KV cache, greedy / sampled, streamed) and `python -m train.generate`.

References: transformers' `generate(do_sample=False)` on the same HF folder (the tiny Llama with its weights
scaled, so that greedy tokens depend on the whole prompt), the samples the finished smoke run (`sft_run`,
tests/conftest.py) wrote at its evaluations, in-process generation for the CLI's files, and a fake generator that
records the prompts of the interactive loop.
"""

import io
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from mtlora_jax import models
from train import chat, conversation, generation, saved_run

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
LONG = [("system", "You are terse. " * 6), ("user", "2 + 2?"), ("assistant", "4."), ("user", "And 3 + 3?")]


@pytest.fixture(scope="module")
def torch():
    """Torch on one thread: on a shared 2-core machine its thread pool fights XLA's."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp_llama(tiny_llama, torch, tmp_path_factory) -> str:
    """The tiny Llama with every weight but the norms x30: its greedy tokens vary (the 0.02-std random init
    repeats the prompt's last token) with top-2 logit gaps > 0.02, far above float32 noise."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(30.0)
    folder = tmp_path_factory.mktemp("sharp_llama")
    hf.save_pretrained(folder)
    models.load_tokenizer(tiny_llama).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sharp(sharp_llama):
    """(tokenizer, Generator of 8 new tokens, stop ids) of the sharp Llama."""
    tok = models.load_tokenizer(sharp_llama)
    module, params = models.from_pretrained(sharp_llama, head="lm")
    stops = chat.stop_ids(tok)
    gen = generation.Generator(module, params, stop_ids=stops, max_new_tokens=8, pad_id=tok.pad_token_id)
    return tok, gen, stops


@pytest.fixture
def f32():
    """float32 matmuls (GPU / TPU defaults are lower), the same setting in every test that runs `sharp`'s
    compiled programs (the setting is part of their cache key)."""
    with jax.default_matmul_precision("float32"):
        yield


def _prompts(tok):
    return [chat.prompt_ids(tok, messages=[("user", QUESTION)]), chat.prompt_ids(tok, messages=LONG)]


def test_greedy_equals_transformers_generate(sharp_llama, sharp, torch, f32):
    """Prompts of 35 and 71 tokens (left-padded to 64 and 128 here, unpadded in transformers), 8 new tokens."""
    import transformers

    tok, gen, stops = sharp
    hf = transformers.AutoModelForCausalLM.from_pretrained(sharp_llama).eval()
    prompts = _prompts(tok)
    assert [len(p) <= 64 for p in prompts] == [True, False]
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=8, eos_token_id=list(stops),
                              pad_token_id=tok.pad_token_id)  # fmt: skip
        want = out[0, len(ids) :].tolist()
        if want and want[-1] in stops:
            want = want[:-1]  # transformers keeps the stop token; ours ends before it
        got = gen.generate(ids)
        assert got == want and len(got) == 8 and len(set(got)) > 2


def test_sampling_top_k_1_is_greedy_and_a_seed_repeats(sharp, f32):
    tok, gen, _ = sharp
    ids = _prompts(tok)[0]
    greedy = gen.generate(ids)
    assert gen.generate(ids, generation.Sampling(temperature=1.0, top_k=1, seed=5)) == greedy
    assert gen.generate(ids, generation.Sampling(temperature=0.7, top_p=1e-6, seed=5)) == greedy  # nucleus of one
    first = gen.generate(ids, generation.Sampling(temperature=1.0, seed=0))
    assert gen.generate(ids, generation.Sampling(temperature=1.0, seed=0)) == first != greedy
    assert gen.generate(ids, generation.Sampling(temperature=1.0, seed=1)) != first
    with pytest.raises(ValueError, match="--top_p=0"):
        generation.check_sampling(generation.Sampling(top_p=0.0))


def test_stream_yields_the_tokens_one_by_one_and_stops_before_a_stop_token(sharp, f32):
    tok, gen, _ = sharp
    ids = _prompts(tok)[1]
    sampling = generation.Sampling(temperature=1.0, seed=3)
    whole = gen.generate(ids, sampling)
    stream = gen.stream(ids, sampling)
    assert next(stream) == whole[0]  # produced before the rest
    assert [whole[0], *stream] == whole
    stop = whole[5]
    stopped = generation.Generator(gen.module, gen.params, stop_ids=(stop,), max_new_tokens=8, pad_id=0)
    assert stopped.generate(ids, sampling) == whole[: whole.index(stop)]


# The command line, on the finished smoke run ---------------------------------------------------------------------

INPUT_ROWS = [  # sent --raw, so that each row's answer differs and their order shows
    {"prompt": "Q: 1 + 1 ="},
    {"messages": [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "x"}]},
    {"id": 3, "prompt": "All that glitters"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]},
]
INPUT_TEXTS = ["Q: 1 + 1 =", "The quick brown fox", "All that glitters", "2 + 2?"]  # what --raw sends of each


@pytest.fixture(scope="module", autouse=True)
def cli(sft_run, sft_xla_env, tmp_path_factory):
    """Every `python -m train.generate` of this file, started at once before its first test, so that they run
    while the in-process tests do (several seconds each: imports, loading, compiling). cli(name) waits for one."""
    tmp = tmp_path_factory.mktemp("generate_cli")
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in INPUT_ROWS))
    (tmp / "bad.jsonl").write_text('{"prompt": "Hi"}\n\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    (tmp / "taken.jsonl").write_text("keep me\n")
    run, new = f"--workdir={sft_run}", "--max_new_tokens=6"
    commands = {
        "base_only": [run, f"--prompt={QUESTION}", new, "--base_only"],
        "input": [run, f"--input={tmp / 'in.jsonl'}", f"--output={tmp / 'out.jsonl'}", "--raw", new],
        "exists": [run, f"--input={tmp / 'in.jsonl'}", f"--output={tmp / 'taken.jsonl'}"],
        "bad_row": [run, f"--input={tmp / 'bad.jsonl'}", f"--output={tmp / 'taken.jsonl'}", "--overwrite"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "train.generate", *args], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=sft_xla_env)
             for name, args in commands.items()}  # fmt: skip
    done = {}

    def result(name: str) -> subprocess.CompletedProcess:
        if name not in done:
            out, err = procs[name].communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(commands[name], procs[name].returncode, out, err)
        return done[name]

    result.tmp = tmp
    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _samples(workdir, name):
    return [json.loads(x) for x in (workdir / "samples" / f"{name}.jsonl").read_text().splitlines()]


def test_cli_base_only_prompt_prints_the_base_models_answer(sft_run, cli):
    """--prompt is the run's first sample prompt, --base_only: the answer printed is the one the run wrote for the
    base model (samples/before.jsonl), not the trained one (samples/4.jsonl; the adapted model is --input's)."""
    after, before = _samples(sft_run, "4")[0], _samples(sft_run, "before")[0]
    assert after["prompt"] == before["prompt"]
    assert before["prompt"].endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert after["prediction"] != before["prediction"]
    proc = cli("base_only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == before["prediction"] + "\n"


def test_cli_input_rows_get_one_prediction_each_in_order(sft_run, cli):
    """{"prompt"} and {"messages"} rows (a chat is answered up to its last user turn), compared with the run's best
    adapters generating in-process."""
    run = saved_run.load(str(sft_run), head={"head": "lm"})
    tok = run.model.tokenizer
    gen = generation.Generator(run.model.module, run.merged, stop_ids=chat.stop_ids(tok), max_new_tokens=6,
                               pad_id=tok.pad_token_id)  # fmt: skip
    want = [tok.decode(gen.generate(chat.prompt_ids(tok, prompt=t)), skip_special_tokens=True) for t in INPUT_TEXTS]
    assert len(set(want)) == len(INPUT_ROWS)  # the order is visible
    proc, dst = cli("input"), cli.tmp / "out.jsonl"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote 4 answers to {dst}" in proc.stdout
    got = [json.loads(x) for x in dst.read_text().splitlines()]
    assert all(set(g) == {"prediction"} for g in got)
    assert [g["prediction"] for g in got] == want


def test_cli_refuses_an_existing_output_and_names_a_bad_input_row(cli):
    taken, bad = cli.tmp / "taken.jsonl", cli.tmp / "bad.jsonl"
    proc = cli("exists")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --output={taken} exists; pass --overwrite to replace it"
    )  # fmt: skip
    proc = cli("bad_row")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f'error: {bad}:3: expected {{"prompt": str}} or {{"messages": [...]}} with a user')
    assert taken.read_text() == "keep me\n"  # neither call wrote it


# The interactive loop --------------------------------------------------------------------------------------------


class _Recorder:
    """A generator that records the prompt ids it gets and answers "Answer <n>." each time."""

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def stream(self, ids, sampling):
        self.prompts.append(list(ids))
        yield from self.tok(f"Answer {len(self.prompts)}.", add_special_tokens=False)["input_ids"]


def test_chat_loop_keeps_the_conversation_and_reset_clears_it(tiny_llama):
    tok = models.load_tokenizer(tiny_llama)
    template = lambda turns: tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                     add_generation_prompt=True)  # fmt: skip
    fake, out = _Recorder(tok), io.StringIO()
    lines = io.StringIO(f"{QUESTION}\nAnd of Italy?\n/reset\nHello\n\nnever read\n")
    conversation.chat_loop(fake, tok, generation.GREEDY, system="Be brief.", raw=False, lines=lines, out=out)
    assert [tok.decode(p) for p in fake.prompts] == [
        template([("system", "Be brief."), ("user", QUESTION)]),
        template([("system", "Be brief."), ("user", QUESTION), ("assistant", "Answer 1."), ("user", "And of Italy?")]),
        template([("system", "Be brief."), ("user", "Hello")]),  # after /reset: the first answer is gone
    ]
    shown = out.getvalue()
    assert "Answer 1.\n" in shown and "Answer 2.\n" in shown and "Answer 3.\n" in shown
    assert "Answer 4." not in shown  # the empty line ended the chat

    fake = _Recorder(tok)
    conversation.chat_loop(fake, tok, generation.GREEDY, system=None, raw=True, lines=io.StringIO("Once upon\n"),
                       out=io.StringIO())  # fmt: skip
    assert fake.prompts == [tok("Once upon")["input_ids"]]
