"""``make demo``: the whole factory on this machine, printing what it does.

Provisions the base model, starts the local stack, submits the batch, waits, shows the registry,
serves every adapter from one base model, and prints each persona's answer next to the base model's.
The stack stays up afterwards (``adapterfab down`` stops it).

    python -m adapterfab.demo examples/personas.yaml
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from adapterfab.procs import tool

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"\n[demo {time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def cli(*args: str, check: bool = True) -> tuple[int, str]:
    cmd = [tool("adapterfab"), *args]
    print("$ adapterfab " + " ".join(args), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        print("  " + line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0 and check:
        raise SystemExit(f"demo failed: `adapterfab {' '.join(args)}` exited with {proc.returncode}")
    return proc.returncode, "".join(lines)


def chat(url: str, key: str, model: str, prompt: str, max_tokens: int = 48) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "messages": [{"role": "user", "content": prompt}],
                         "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"].strip()


def main(spec_path: str = "examples/personas.yaml") -> int:
    import yaml

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.settings import Settings

    spec = yaml.safe_load(Path(spec_path).read_text())
    say(f"1/7 provisioning the base model {spec.get('base_model')} (converted once, then cached)")
    ref = resolve_base_model(spec.get("base_model", "smollm2-135m-instruct"))
    print(f"  {ref.path}\n  fingerprint {ref.fingerprint[:16]}...")

    say("2/7 starting the local stack (Ray head, MLflow tracking server on SQLite, artifact folder)")
    cli("up")

    say(f"3/7 validating and planning {spec_path}")
    cli("validate", spec_path)
    cli("plan", spec_path)

    say("4/7 submitting the batch: Ray Data prepares each tenant's data, Ray Train fits each adapter")
    rc, _ = cli("submit", spec_path, "--wait", check=False)
    if rc != 0:
        print("  (not every job succeeded: see the table above; the demo serves those that did)")

    say("5/7 the MLflow registry: one registered model per tenant/persona, aliases candidate/production")
    cli("registry", "ls")

    say("6/7 serving every adapter from one shared base model (Ray Serve, OpenAI-compatible)")
    cli("serve", "--detach")
    settings = Settings.load()
    url = settings.serve_url or "http://127.0.0.1:8000"
    keys: dict[str, str] = {}
    for tenant in sorted({t["tenant"] for t in spec["tenants"]}):
        keys[tenant] = cli("keys", "create", tenant)[1].split()[-1]

    say("7/7 each persona next to the base model, on a prompt none of them was trained on")
    prompts = json.loads((Path(spec_path).parent / "heldout_prompts.json").read_text())["prompts"]
    for i, t in enumerate(spec["tenants"]):
        prompt = prompts[i % len(prompts)]
        model = f"{t['tenant']}/{t['persona']}"
        key = keys[t["tenant"]]
        try:
            base = chat(url, key, "base", prompt)
            tuned = chat(url, key, model, prompt)
        except httpx.HTTPError as e:
            print(f"  {model}: request failed: {e}")
            continue
        print(f"\n  prompt: {prompt}\n    base model   : {base}\n    {model:13s}: {tuned}")

    tenant0 = spec["tenants"][0]
    say(f"done in {time.monotonic() - T0:.0f}s. The stack is still running:")
    print(f"  endpoint:   {url}/v1/chat/completions   (MLflow {settings.mlflow_uri}, "
          f"Ray dashboard {settings.dashboard_url})")
    print("  try it:")
    print(f"    curl -s {url}/v1/chat/completions \\\n"
          f"      -H 'Authorization: Bearer {keys[tenant0['tenant']]}' -H 'Content-Type: application/json' \\\n"
          f"      -d '{{\"model\": \"{tenant0['tenant']}/{tenant0['persona']}\", \"temperature\": 0, "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of Spain?\"}}]}}'")
    print(f"  stop it:    make down   (or ADAPTERFAB_HOME={settings.home} .venv/bin/adapterfab down)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
