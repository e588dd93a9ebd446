"""The method quality benchmark on the SmolLM2-135M base (CPU): every method trained with its defaults on
every persona of examples/quality_personas.json (a fixed phrase, a speaking style, a domain of
knowledge), each measured for persona adherence on held-out prompts and for retention of the facts of
adapterfab/retention_probes.json that the base itself states (its answers computed in the same run), plus
trainable params, adapter bytes, step time and peak memory. Each (method, persona) trains in its own
process. Writes bench/results/methods-<date>.json and a line in bench/RESULTS.md.

    .venv/bin/python bench/methods.py                         # lora, qlora, lora_xs x pirate, bard, orbit
    .venv/bin/python bench/methods.py --methods lora_xs --personas bard --train '{"learning_rate": 2e-3}'
    .venv/bin/python bench/methods.py --sizes                 # adapter bytes at equal rank, SVD time
    .venv/bin/python bench/methods.py --smoke                 # tiny random base, 2 steps: no result file

GPU (a ~1B Llama-shaped model with random weights) is measured only where a GPU is lent; this script
records the CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = {
    "lora": {"name": "lora"},
    "qlora": {"name": "qlora"},
    "lora_xs": {"name": "lora_xs"},
}


def run_base(base_model: str, threads: int, limit: int | None) -> dict:
    """The base's own answers: which probes it states, and its adherence to each persona (about none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.jobs.evaluate import load_quality, quality, states_fact
    from adapterfab.textgen import greedy_in_batches

    torch.set_num_threads(threads)
    personas, probes = load_quality()
    probes = probes[:limit]
    base = resolve_base_model(base_model)
    tok = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    questions = [p["question"] for p in probes]
    answers = greedy_in_batches(model, tok, questions)
    known = [states_fact(a, p["answers"]) for a, p in zip(answers, probes)]
    out: dict = {"known": known, "answers": answers, "retention_with_opening": {},
                 "adherence": {p["name"]: quality(model, tok, p, [], []).to_dict()["adherence"] for p in personas}}
    # the persona's own context effect: the base, its answers forced to start with the persona's opening
    for persona in personas:
        if persona.get("opening"):
            opened = greedy_in_batches(model, tok, questions, opening=persona["opening"])
            kept = sum(k and states_fact(a, p["answers"]) for k, a, p in zip(known, opened, probes))
            out["retention_with_opening"][persona["name"]] = round(kept / max(1, sum(known)), 4)
    return out


def run_one(method_json: str, persona_name: str, known: list[bool], steps: int | None, threads: int,
            base_model: str, train: dict, retain_kl: float = 0.0, replay_kl: float = 0.0,
            base_answers: list[str] | None = None) -> dict:
    import resource

    from adapterfab.basemodel import pad_token_id
    from adapterfab.jobs.evaluate import EXAMPLES, forced_retention, forced_rows, load_quality, quality, train_persona

    def forced_retention_of_base(model, rows, pad):  # noqa: ANN001, ANN202 - the adapter switched off
        with model.disable_adapter():
            return forced_retention(model, rows, pad)

    personas, probes = load_quality()
    persona = next(p for p in personas if p["name"] == persona_name)
    if replay_kl:  # the product's setting (adapterfab/replay.py)
        train = {**train, "replay_weight": replay_kl}
    model, tok, out = train_persona(json.loads(method_json), EXAMPLES / persona["dataset"], steps, threads,
                                    base_model, train, retain_kl)
    t0 = time.monotonic()
    report = quality(model, tok, persona, probes[:len(known)], known)
    out["eval_s"] = round(time.monotonic() - t0, 2)
    out.update(report.to_dict())
    # the cheap signal a job could compute (no generation): the fact chosen greedily after the base's own
    # answer up to it, over the probes where the base does the same; compared with generated retention
    t0 = time.monotonic()
    rows = forced_rows(tok, probes[:len(known)], base_answers)
    pad = pad_token_id(tok)
    base_ok = forced_retention_of_base(model, rows, pad)
    mine = forced_retention(model, rows, pad)
    counted = [i for i, ok in enumerate(base_ok) if ok]
    out["forced_retention"] = round(sum(bool(mine[i]) for i in counted) / max(1, len(counted)), 4)
    out["forced_probes"] = len(counted)
    out["forced_s"] = round(time.monotonic() - t0, 2)
    out["answers"], out["probe_answers"] = report.answers, report.probe_answers
    out["persona"] = persona_name
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"{args[:4]} failed")
    return json.loads(line[7:])


def adapter_sizes() -> dict:
    """LoRA-XS vs LoRA adapter bytes at the same rank on the same modules (expect r^2 vs r*(in+out) per
    module), and the one-off SVD time of the shared basis. No training: attach, save, measure."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.methods import get_method

    base = resolve_base_model("smollm2-135m-instruct")
    rows = []
    for targets in (["q_proj", "v_proj"], "all-linear"):
        for r in (8, 16):
            row: dict = {"targets": targets, "r": r}
            for name in ("lora", "lora_xs"):
                impl = get_method(name)
                cfg = impl.config_cls(name=name, r=r, alpha=r, target_modules=targets)
                model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
                basis = None
                if impl.compute_basis is not None:
                    t0 = time.monotonic()
                    basis = impl.compute_basis(model, cfg, base.fingerprint)
                    row["svd_s"] = round(time.monotonic() - t0, 3)
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    impl.save(impl.apply(model, cfg, basis), cfg, Path(tmp))
                    row[f"{name}_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            row["ratio"] = round(row["lora_bytes"] / row["lora_xs_bytes"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"sizes": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--personas", default=None, help="default: every persona of examples/quality_personas.json")
    ap.add_argument("--steps", type=int, default=None, help="override the method's default steps")
    ap.add_argument("--train", default="{}", help="JSON: train settings over the method's defaults")
    ap.add_argument("--method", default="{}", help="JSON: method settings over its defaults (r, alpha, ...)")
    ap.add_argument("--retain-kl", type=float, default=0.0, help="study: a KL term to the base in the loss "
                    "(jobs/train_loop.retain_loss); not a product setting")
    ap.add_argument(
        "--replay-kl",
        type=float,
        default=0.0,
        help="study: distil the base's own answers to general "
        "prompts, after the persona's opening, into the adapter: train.replay_weight (adapterfab/replay.py)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny random base, 2 steps, 8 probes: no result file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--persona", help=argparse.SUPPRESS)
    ap.add_argument("--known", help=argparse.SUPPRESS)
    ap.add_argument("--base", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-model", default="smollm2-135m-instruct", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", action="store_true", help="only adapter bytes at equal rank + SVD time")
    args = ap.parse_args()
    if args.sizes:
        import torch

        torch.set_num_threads(args.threads)
        res = adapter_sizes()
        stamp = time.strftime("%Y-%m-%d")
        out = REPO / "bench" / "results" / f"sizes-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"date": stamp, **res}, indent=1))
        summary = "; ".join(
            f"{'q,v' if isinstance(r['targets'], list) else r['targets']} r{r['r']}: LoRA-XS "
            f"{r['lora_xs_bytes']:,} B vs LoRA {r['lora_bytes']:,} B ({r['ratio']}x), SVD {r['svd_s']} s"
            for r in res["sizes"]
        )
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"- {stamp} · methods.py --sizes · {platform.machine()} {os.cpu_count()} CPU · SmolLM2-135M fp32 "
                    f"adapter files at equal rank and modules · {summary} "
                    f"(`.venv/bin/python bench/methods.py --sizes`; {out.relative_to(REPO)})\n")
        return 0
    if args.base:
        print("RESULT " + json.dumps(run_base(args.base_model, args.threads, 8 if args.smoke else None)), flush=True)
        return 0
    if args.one:
        base = json.loads(Path(args.known).read_text())
        print("RESULT " + json.dumps(run_one(args.one, args.persona, base["known"], args.steps, args.threads,
                                             args.base_model, json.loads(args.train), args.retain_kl,
                                             args.replay_kl, base["answers"])), flush=True)
        return 0
    return run_matrix(args)


def run_matrix(args: argparse.Namespace) -> int:
    import tempfile

    from adapterfab.jobs.evaluate import load_quality

    base_model, steps = args.base_model, args.steps
    if args.smoke:
        from adapterfab.basemodel import resolve_base_model, tiny_random_llama

        tokenizer = os.environ.get("ADAPTERFAB_TOKENIZER_DIR") or resolve_base_model(base_model).path
        base_model = tiny_random_llama(Path(tempfile.mkdtemp(prefix="methods-smoke-")), tokenizer)
        steps = 2
    personas = args.personas.split(",") if args.personas else [p["name"] for p in load_quality()[0]]
    common = ["--threads", str(args.threads), "--base-model", base_model] + (["--smoke"] if args.smoke else [])
    retain = (["--retain-kl", str(args.retain_kl)] if args.retain_kl else []) + \
        (["--replay-kl", str(args.replay_kl)] if args.replay_kl else [])
    t0 = time.monotonic()
    base = _child(["--base", *common])
    print(json.dumps({"base": base["adherence"], "probes_the_base_states": sum(base["known"]),
                      "base_retention_with_opening": base["retention_with_opening"]}), flush=True)
    results = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"known": base["known"], "answers": base["answers"]}, f)
    for name in args.methods.split(","):
        spec = {**DEFAULT_METHODS.get(name, {"name": name}), **json.loads(args.method)}
        for persona in personas:
            cmd = ["--one", json.dumps(spec), "--persona", persona, "--known", f.name, "--train", args.train,
                   *common, *retain]
            r = _child(cmd + (["--steps", str(steps)] if steps else []))
            results.append(r)
            print(json.dumps({k: r[k] for k in ("persona", "adherence", "retention", "forced_retention", "lost",
                                                "adapter_bytes", "step_s_median", "train_s", "eval_s", "forced_s")}
                             | {"method": name}), flush=True)
    os.unlink(f.name)
    if args.smoke:
        assert all(0 <= r["adherence"] <= 1 and 0 <= r["retention"] <= 1 for r in results)
        print(f"smoke: {len(results)} runs in {time.monotonic() - t0:.0f} s")
        return 0
    stamp = time.strftime("%Y-%m-%d")
    sys.path.insert(0, str(REPO / "bench"))
    from factory_throughput import machine as describe  # the CPU's model and AVX-512, as the other benches

    machine = describe(os.cpu_count() or 1)
    out = REPO / "bench" / "results" / f"methods-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": stamp, "machine": machine, "base": base, "retain_kl": args.retain_kl,
                               "replay_kl": args.replay_kl,
                               "train_overrides": json.loads(args.train),
                               "method_overrides": json.loads(args.method), "results": results}, indent=1))
    by_method: dict[str, list] = {}
    for r in results:
        by_method.setdefault(r["method"]["name"], []).append(r)
    summary = "; ".join(
        f"{m}: "
        + ", ".join(
            f"{r['persona']} adherence {r['adherent']}/{r['prompts']} retention {r['kept']}/{r['known']}"
            f" (teacher-forced {r['forced_retention']:.0%} of {r['forced_probes']})"
            for r in rs
        )
        + f" ({rs[0]['adapter_bytes'] / 1024:.0f} KiB, {rs[0]['step_s_median']} s/step)"
        for m, rs in by_method.items()
    )
    overrides = "".join(f" --{k} '{v}'" for k, v in (("train", args.train), ("method", args.method)) if v != "{}")
    overrides += f" --retain-kl {args.retain_kl:g}" if args.retain_kl else ""
    overrides += f" --replay-kl {args.replay_kl:g}" if args.replay_kl else ""
    opened = ", ".join(f"{k} {v:.0%}" for k, v in base["retention_with_opening"].items())
    chosen = f" --methods {args.methods}" if args.methods != ",".join(DEFAULT_METHODS) else ""
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(
            f"- {stamp} · methods.py · {machine} · SmolLM2-135M, defaults{overrides}, retention over the "
            f"{sum(base['known'])} probes the base states (the base itself with the persona's opening forced: "
            f"{opened}) · {summary} "
            f"(`.venv/bin/python bench/methods.py{chosen}"
            f"{(' --personas ' + args.personas) if args.personas else ''}{overrides}`; {out.relative_to(REPO)})\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
