"""``adapterfab.threads.importing``: the orchestrator's threads import transformers and peft lazily, and
two threads importing them at once fail in one of them ("cannot import name 'AutoTokenizer' from
'transformers'", seen in tests/e2e/test_faults.py when a window was tokenized in the orchestrator while
the registrar wrote a fused adapter's PEFT config). Each run is a fresh interpreter, where nothing is
imported yet. Without the lock (the same script, its imports bare) 3 of 3 runs failed here."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys, threading
from adapterfab.pipelines.data import load_tokenizer
from adapterfab.threads import importing

errors = []
def tokenizer():
    try:
        load_tokenizer(sys.argv[1])
    except Exception as e:
        errors.append(repr(e))
def peft():
    try:
        with importing():
            from peft import LoraConfig  # as adapterfab/methods/base.py _lora_config_defaults does
    except Exception as e:
        errors.append(repr(e))
def model():
    try:
        with importing():
            from transformers import AutoModelForCausalLM  # as the LoRA-XS basis does
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=f) for f in (tokenizer, peft, model)]
for t in threads: t.start()
for t in threads: t.join()
print("ERRORS" if errors else "OK", errors[:2])
"""


def test_threads_importing_transformers_and_peft_at_once_all_succeed(tiny_model_path: str) -> None:
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_path], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("OK"), r.stdout + r.stderr[-2000:]
