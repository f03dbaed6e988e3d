"""core/quiet: third-party logging, bars and warnings stay off the console and go to the run's events.log."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    warnings.simplefilter("default")  # every warning shown once, so each one reaches showwarning
    from pathlib import Path
    from sdtune.core import quiet

    quiet.install()
    import diffusers.utils.logging as dlog  # configures its console handler, as at a real start
    import transformers.utils.logging as tlog

    log = Path(sys.argv[1])
    tlog.get_logger("transformers.modeling_utils").warning("before the run: silenced")
    exec(compile("import warnings; warnings.warn('early notice', DeprecationWarning)",
                 "/elsewhere/site-packages/early.py", "exec"))
    with quiet.run_log(log):
        dlog.get_logger("diffusers.models").warning("modules should be kept in float32")
        logging.getLogger("accelerate.utils").warning("accelerate notice")
        exec(compile("import warnings; warnings.warn('`torch_dtype` is deprecated', FutureWarning)",
                     "/elsewhere/site-packages/lib.py", "exec"))
        bar = tlog.tqdm(range(3), desc="Loading weights")
        list(bar)
        exec(compile("import warnings; warnings.warn('set data.path to a folder', UserWarning)",
                     quiet._SDTUNE_DIR + "/fake.py", "exec"))
    print("sdtune line")
    """
)


def test_third_party_messages_go_to_the_run_log_and_sdtune_warnings_to_the_console(tmp_path):
    log = tmp_path / "events.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "sdtune line\n"
    assert result.stderr == "warning: set data.path to a folder\n"  # sdtune's own warning, as written
    lines = log.read_text(encoding="utf-8").splitlines()
    assert not any("before the run" in line for line in lines)  # the libraries' notices before a run: silenced
    assert any(line.endswith("debug diffusers.models: modules should be kept in float32") for line in lines)
    assert any(line.endswith("debug accelerate.utils: accelerate notice") for line in lines)
    assert any("debug sdtune.third_party: FutureWarning: `torch_dtype` is deprecated" in line for line in lines)
    assert not any("Loading weights" in line for line in lines)  # bars are off, not logged
    assert lines[0].endswith("early notice (/elsewhere/site-packages/early.py:1)")  # kept until the run log existed
    assert " debug sdtune.third_party: DeprecationWarning" in lines[0]
