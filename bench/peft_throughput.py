"""End-to-end training throughput: `python -m train.glue` against PEFT LoRA in PyTorch, same data and settings.

Both sides fine-tune all-MiniLM-L6-v2 on the same real GLUE train examples (the first --examples of --task from
../shared/data/glue, tokenized to at most 128 tokens by the same tokenizer), batch 16, lr 1e-3 (linear schedule,
6 % warmup, weight decay 0.1), dropout 0.1, adapters of rank 8 (alpha 16) on query, value, FFN-in and FFN-out with
the pooler and classifier trained:

  ours   `python -m train.glue --config configs/<task>.py:minilm ...` as a user runs it (its own batching,
         --batching), one run per --structures entry; examples/s from its metrics.jsonl log intervals
  peft   transformers' Trainer with a PEFT LoRA model, `group_by_length` sampling (transformers 5:
         `train_sampling_strategy="group_by_length"`, its fastest batching: length-sorted megabatches, each batch
         padded to its own longest row) and `DataCollatorWithPadding`; examples/s from the wall time of its steps

Each side runs in its own process, one after another, the order rotated every round. Steady state: the examples
of the steps after --skip divided by their wall time (process start, loading, tokenizing and, for ours, the compiles
of the first steps excluded; a bucket first met later, compiled or read from the persistent compilation cache,
stays in). A first `ours` run of each structure fills that cache and is not counted (--warmup). The ratio is ours /
PEFT within each round; the table gives the median and the range over the rounds.

    python -m bench.peft_throughput --task mrpc --steps 150 --rounds 3 --structures lora,ctcm
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = r".*\.(attention\.self\.(query|value)|intermediate\.dense|layer\.\d+\.output\.dense)"
SETTINGS = dict(batch_size=16, learning_rate=1e-3, warmup_ratio=0.06, weight_decay=0.1, rank=8, alpha=16.0,
                max_length=128)  # fmt: skip
DATA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "glue")


def _run(cmd: list[str], cwd: str) -> str:
    """Runs a side's process; its stdout, or a RuntimeError with the end of its stderr."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def steady_rate(records: list[dict], skip: int, batch_size: int) -> float:
    """Examples/s over the train log intervals that start at or after step `skip`.

    Args:
      records: metrics.jsonl "train" records in step order, each {"step", "examples_per_s"} over the steps since
        the previous record.
      skip: the first steps left out.
      batch_size: examples per step.
    """
    seconds, counted, prev = 0.0, 0, 0
    for r in records:
        n = int(r["step"]) - prev
        if prev >= skip:
            seconds += n * batch_size / r["examples_per_s"]
            counted += n
        prev = int(r["step"])
    if not counted:
        raise ValueError(f"no log interval starts at or after step {skip} (--skip) before step {prev}")
    return counted * batch_size / seconds


def run_ours(
    task: str, structure: str, steps: int, examples: int, skip: int, batching: str, data_dir: str, repo: str = REPO
) -> float:
    """Steady-state examples/s of one `train.glue` run in `repo` (after `skip` steps), from its metrics.jsonl;
    batching "" leaves config.batching out (a checkout from before it existed)."""
    s = SETTINGS
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [
            sys.executable, "-m", "train.glue", f"--config=configs/{task}.py:minilm", f"--workdir={workdir}",
            f"--config.num_train_steps={steps}", f"--config.batch_size={s['batch_size']}",
            f"--config.learning_rate={s['learning_rate']}", f"--config.warmup_ratio={s['warmup_ratio']}",
            f"--config.weight_decay={s['weight_decay']}", f"--config.max_length={s['max_length']}",
            f"--config.data_dir={data_dir}", f"--config.max_train_examples={examples}", "--config.max_eval_examples=16",
            "--config.eval_every_steps=0",
            f"--config.checkpoint_every_steps={steps}", "--config.log_every_steps=10",
            f"--config.mtlora.structure={structure}", f"--config.mtlora.rank={s['rank']}",
            f"--config.mtlora.alpha={s['alpha']}",
        ] + ([f"--config.batching={batching}"] if batching else [])  # fmt: skip
        _run(cmd, repo)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if '"train"' in line]
    return steady_rate(records, skip, s["batch_size"])


def peft_main(task: str, steps: int, examples: int, skip: int, data_dir: str) -> float:
    """(In a subprocess.) One PEFT LoRA Trainer run; prints {"examples_per_s": ...} as its last line and returns it."""
    import datasets
    import peft
    import torch
    import transformers

    from configs import glue_common
    from train.glue import data as glue_data
    from train.glue import tasks as glue_tasks

    s = SETTINGS
    spec = glue_tasks.get_task(task)
    ex = glue_data.load_task(task, "train", data_dir=data_dir, source="local", max_examples=examples)
    path = glue_common.minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(ex.text_a, ex.text_b, truncation=True, max_length=s["max_length"])
    ds = datasets.Dataset.from_dict({**enc, "labels": [int(y) for y in ex.labels]})
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                           target_modules=TARGETS, modules_to_save=["pooler"])  # fmt: skip
    model = peft.get_peft_model(model, lora)
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=s["batch_size"], learning_rate=s["learning_rate"],
            max_steps=steps, warmup_steps=s["warmup_ratio"], weight_decay=s["weight_decay"],
            lr_scheduler_type="linear", train_sampling_strategy="group_by_length", logging_steps=10,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )  # fmt: skip
        collator = transformers.DataCollatorWithPadding(tok)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()]
        )
        trainer.train()
    if not 0 < skip < len(times):
        raise ValueError(f"--skip {skip} leaves no step of {len(times)} to time")
    rate = (len(times) - skip) * s["batch_size"] / (times[-1] - times[skip - 1])
    print(json.dumps({"examples_per_s": rate, "torch_threads": torch.get_num_threads()}))
    return rate


def run_peft(task: str, steps: int, examples: int, skip: int, data_dir: str) -> float:
    """Steady-state examples/s of one PEFT run (its own process)."""
    cmd = [sys.executable, "-m", "bench.peft_throughput", "--side=peft", f"--task={task}", f"--steps={steps}",
           f"--examples={examples}", f"--skip={skip}", f"--data_dir={data_dir}"]  # fmt: skip
    out = _run(cmd, REPO)
    return json.loads(out.strip().splitlines()[-1])["examples_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mrpc", help="GLUE task with a configs/<task>.py:minilm variant")
    parser.add_argument("--structures", default="lora,ctcm", help="our runs, comma-separated (lora = T = I)")
    parser.add_argument("--batching", default="length_grouped", help="our config.batching")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    parser.add_argument("--skip", type=int, default=30, help="first steps left out of the steady state")
    parser.add_argument("--examples", type=int, default=4000, help="train examples (the first N)")
    parser.add_argument("--data_dir", default=DATA_DIR, help="GLUE folder in the official layout")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="count the first runs too")
    parser.add_argument("--before", default="", help="a checkout of an older commit: its train.glue (buckets) runs "
                        "the first structure as one more variant, `before`")  # fmt: skip
    parser.add_argument("--side", choices=("peft",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.side == "peft":
        return peft_main(args.task, args.steps, args.examples, args.skip, args.data_dir)
    run = lambda structure, batching, repo=REPO: run_ours(
        args.task, structure, args.steps, args.examples, args.skip, batching, args.data_dir, repo
    )
    ours = {f"ours-{s}": (lambda s=s: run(s, args.batching)) for s in args.structures.split(",")}
    if args.before:
        first = args.structures.split(",")[0]
        before = os.path.abspath(args.before)
        ours[f"before-{first}"] = lambda: run(first, "", before)
    variants = {**ours, "peft-lora": lambda: run_peft(args.task, args.steps, args.examples, args.skip, args.data_dir)}
    if args.warmup:
        for name, fn in ours.items():
            print(f"warm-up {name}: {fn():.1f} examples/s (not counted)", flush=True)
    rates = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(variants[name]())
            print(f"round {r}: {name} {rates[name][-1]:.1f} examples/s", flush=True)
    print(f"{args.task}, {args.examples} train examples, {args.steps} steps (steady state after {args.skip}), "
          f"our batching {args.batching}; median (range) over {args.rounds} rounds")  # fmt: skip
    for name, xs in rates.items():
        ratios = [a / b for a, b in zip(xs, rates["peft-lora"], strict=True)]
        print(f"{name:<12} {statistics.median(xs):6.1f} examples/s ({min(xs):.1f}-{max(xs):.1f}); / PEFT "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
