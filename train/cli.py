"""What every job's `__main__.py` shares: flag parsing, logging set-up, one-line errors and the exit status.

A job's entry point defines its absl flags (--config, --workdir, --verbose), a `main(argv)` that calls
`cli.main(argv, train_and_evaluate, _CONFIG.value, _WORKDIR.value, _VERBOSE.value)`, and runs
`app.run(main, flags_parser=cli.parse_flags)`.

Exit status: 0 after the summary is written, 143 (128 + SIGTERM) after a SIGTERM saved a checkpoint, 2 for a bad
config or input, 1 for a failure during the run. An error prints one line, `error: <message>`, on stderr (the
progress bar is closed first); the traceback only with --verbose or MTLORA_DEBUG=1.
"""

import ast
import contextlib
import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging

# Exit status after a SIGTERM (128 + 15, what a shell reports for a process killed by it): checkpoint saved.
SIGTERM_EXIT = 143
BAD_INPUT_EXIT, FAILED_EXIT = 2, 1
# A bad config value, file or model: the user's input to fix (exit 2); anything else failed during the run (1).
INPUT_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OSError)


def debug(argv=()) -> bool:
    """Tracebacks wanted: MTLORA_DEBUG=1 in the environment, or --verbose on the command line."""
    return os.environ.get("MTLORA_DEBUG", "").lower() in ("1", "true", "yes", "on") or "--verbose" in argv


def one_line(e: BaseException) -> str:
    """The exception's message on one line: ml_collections' repr-quoted messages unquoted, an embedded traceback
    (config_flags wraps a failing get_config in one) cut to its last line."""
    text = str(e).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        with contextlib.suppress(ValueError, SyntaxError):
            text = str(ast.literal_eval(text))
    if "Traceback (most recent call last)" in text:
        head = text.split(":", 1)[0] if text.startswith("flag --") else ""
        text = (head + ": " if head else "") + text.strip().splitlines()[-1].strip()
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def _load_config(argv):
    """The config that --config names (before any override), or None when it does not load."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if not path:
        return None
    file, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_mtlora_cli_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg or None)
    except Exception:  # noqa: BLE001 (only a hint: the error itself is reported)
        return None


def _config_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if hasattr(v, "items") and not isinstance(v, dict):
            out += _config_keys(v, f"{prefix}{k}.")
    return out


def _unknown_key_message(argv) -> str | None:
    """For a --config.<key>=... override naming no key: the closest valid keys (None when all keys exist)."""
    config = _load_config(argv)
    if config is None:
        return None
    keys = _config_keys(config)
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") : arg.index("=")]
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
                close = close or difflib.get_close_matches(key, keys, n=3, cutoff=0.0)
                hint = f"; closest: {', '.join(f'config.{c}' for c in close)}" if close else ""
                return f"--config.{key}: no such config key{hint} (configs/base.py and the job's common list them)"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure (an unknown config key, a value of the wrong type, a config
    argument the file does not know) as one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        if debug(argv):
            raise
        message = _unknown_key_message(argv) if isinstance(e, AttributeError | KeyError) else None
        print(f"error: {message or one_line(e)}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT)


def quiet_orbax(record) -> bool:
    """Orbax logs every file of every checkpoint at INFO; keep only its warnings and errors."""
    return record.levelno >= logging.converter.ABSL_TO_STANDARD[logging.WARNING] or "/orbax/" not in record.pathname


def guarded(fn, *args, verbose: bool = False, **kwargs):
    """`fn(*args, **kwargs)`, any failure printed as one line on stderr with exit status 2 (bad input) or 1."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if verbose or debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT if isinstance(e, INPUT_ERRORS) else FAILED_EXIT)


def tool_main(argv: list[str], run, verbose: bool) -> None:
    """A tool's absl main (train.predict, train.generate): no positional arguments, warnings only, `run()` guarded."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    guarded(run, verbose=verbose)


def main(argv: list[str], train_and_evaluate, config, workdir: str, verbose: bool = False) -> dict:
    """Runs `train_and_evaluate(config, workdir)` at INFO with Orbax quiet; exits 143 when SIGTERM stopped it,
    and 2 or 1 with one line on stderr when it failed. Returns the summary."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(quiet_orbax)
    summary = guarded(train_and_evaluate, config, workdir, verbose=verbose)
    if summary is None:
        sys.exit(SIGTERM_EXIT)
    return summary
