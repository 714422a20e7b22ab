"""The README's library quickstart runs as written and learns (docs that drift fail here)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    text = README.read_text()
    section = text.split("## Quickstart: the library", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md:quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "trainable params:" in out
    loss, acc = re.search(r"loss ([\d.]+), accuracy ([\d.]+)", out).groups()
    assert float(loss) < 0.3 and float(acc) >= 0.9, out
