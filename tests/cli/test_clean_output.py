"""What a user sees from `sdtune train` / `sdtune demo` when stdout is not a terminal (CI logs, `| tee`, the web
UI's pipe): sdtune's own lines only, whole progress lines, and user text (file names with `[name]`) literally.

"Third-party" is defined checkably: a line from transformers / diffusers / accelerate / huggingface_hub / torch
is one that carries their logger prefix, a Python warning (`...Warning:`, `warn(`), a tqdm bar (`%|`, `it/s]`) or
their loading notices (`Loading`, `torch_dtype`, `float32`). None may appear on stdout or stderr; their
messages go to events.log as `debug` lines instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdtune.world import write_concept_dataset

NOISE = re.compile(
    r"\[transformers\]|\[diffusers\]|Warning\b|warn\(|%\||it/s\]|Loading|torch_dtype|float32|huggingface|"
    r"Traceback|UserWarning|FutureWarning|DeprecationWarning"
)
PROGRESS = re.compile(
    r"^step (\d+)/(\d+) loss \d+\.\d{4} \(avg \d+\.\d{4}\) lr \d\.\d\de[-+]\d\d [\d.]+ (?:it/s|s/step) "
    r"[\d.]+ (?:img/s|s/img) epoch \d+ ETA (?:\d+h\d\dm|\d+m\d\ds|\d+s|-)$"
)


def sdtune(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    # one thread: on a busy 2-core machine two OpenMP threads wait on each other (steps ~40x slower)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    env |= {"COLUMNS": "60", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,  # pipes: not a terminal
        text=True,
        timeout=timeout,
    )


def third_party(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


def test_train_prints_sdtune_lines_only_whole_progress_lines_and_file_names_literally(tmp_path):
    data = tmp_path / "data"
    write_concept_dataset("teal_heart", data, n=6, token="<th>")
    (data / "[name] broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    config = {
        "method": "textual_inversion",
        "name": "quiet",
        "output_dir": str(tmp_path / "runs"),
        "token": "<th>",
        "init_text": "heart",
        "model": {"base": "builtin"},
        "data": {"path": str(data), "template": "filewords", "batch_size": 2},
        "train": {"max_steps": 6, "mixed_precision": "no"},
        "preview": {"steps": 2, "prompts": ["a [name] on blue"], "every_n_steps": 3},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    result = sdtune("train", "run.yaml", cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert third_party(result.stdout) == [] and third_party(result.stderr) == [], result.stdout + result.stderr
    assert result.stderr.strip() == ""
    lines = result.stdout.splitlines()
    progress = [PROGRESS.match(line) for line in lines if line.startswith("step ") and "/" in line.split()[1]]
    assert progress and all(progress), lines  # every progress line is complete (parses whole)
    assert [int(m[1]) for m in progress][0] == 1 and int(progress[-1][1]) == 6
    assert all(m[2] == "6" for m in progress)
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert len(skipped) == 1 and "[name] broken.png" in skipped[0], lines  # rich would have eaten "[name]"
    assert any(re.fullmatch(r"time: training \S+, previews \S+", line) for line in lines), lines
    # the libraries' own notices are kept for debugging, in events.log, marked as debug lines
    events = (tmp_path / "runs" / "quiet" / "events.log").read_text(encoding="utf-8").splitlines()
    debug = [line for line in events if re.match(r"^\S+ \S+ debug ", line)]
    assert debug and all(re.match(r"^\S+ \S+ debug (diffusers|transformers|accelerate|torch|sdtune)", d) for d in debug)
    assert re.search(r"previews of step 3: 1 images in [\d.]+ s", "\n".join(events))


@pytest.mark.slow  # the demo scores the base model before and after training: over a minute on 2 CPU cores
def test_demo_stdout_holds_no_third_party_lines(tmp_path):
    result = sdtune("demo", "--out", str(tmp_path / "runs"), "--steps", "5", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert third_party(result.stdout) == [], result.stdout
    assert third_party(result.stderr) == [], result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "scoring the built-in model before training ..."  # sdtune's line comes first
    progress = [line for line in lines if line.startswith("step ") and "/" in line.split()[1]]
    assert progress and all(PROGRESS.match(line) for line in progress), progress
