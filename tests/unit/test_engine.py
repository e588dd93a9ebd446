"""The serving engine against plain transformers/peft on a tiny random Llama: token-for-token greedy
parity, adapter switching, stop strings, limits, incremental UTF-8 and adapter refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterfab.serve.engine import (
    AdapterRejected,
    Detokenizer,
    Engine,
    Finished,
    SamplingParams,
    StopMatcher,
    TextDelta,
)

MSGS = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = SamplingParams(max_tokens=24, temperature=0)




@pytest.fixture(scope="module")
def adapters(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory, make_lora_adapter) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora_adapter(tiny_model_path, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def engine(tiny_model_path: str, adapters: dict[str, Path]) -> Engine:
    eng = Engine(tiny_model_path, torch_threads=1)
    eng.load_adapter("acme/a@1", adapters["a"])
    eng.load_adapter("acme/b@1", adapters["b"])
    return eng


def run(engine: Engine, adapter: str | None, params: SamplingParams) -> tuple[str, Finished]:
    events = list(engine.generate(MSGS, adapter, params))
    assert all(isinstance(e, TextDelta) for e in events[:-1]) and isinstance(events[-1], Finished)
    return "".join(e.text for e in events[:-1]), events[-1]


def hf_greedy(model: torch.nn.Module, engine: Engine, prompt: list[int], n: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]),
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=sorted(engine.eos_ids),
                         pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_and_peft(engine: Engine, tiny_model_path: str, adapters: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = engine.encode_chat(MSGS)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    want_base = hf_greedy(plain, engine, prompt, GREEDY.max_tokens)
    with_a = PeftModel.from_pretrained(plain, str(adapters["a"])).eval()
    want_a = hf_greedy(with_a, engine, prompt, GREEDY.max_tokens)
    got_a = list(engine.generate_token_ids(prompt, "acme/a@1", GREEDY))
    got_base = list(engine.generate_token_ids(prompt, None, GREEDY))
    assert got_a == want_a
    assert got_base == want_base
    assert got_a != got_base
    text, done = run(engine, "acme/a@1", GREEDY)
    assert text == engine.tokenizer.decode(got_a, skip_special_tokens=True)
    assert done.completion_tokens == len(got_a) and done.prompt_tokens == len(prompt)


def test_switching_between_adapters_is_stable(engine: Engine) -> None:
    first = {k: run(engine, k, GREEDY)[0] for k in ("acme/a@1", "acme/b@1", None)}
    assert len(set(first.values())) == 3
    for k in ("acme/b@1", None, "acme/a@1", "acme/b@1"):
        assert run(engine, k, GREEDY)[0] == first[k]


def test_seeded_sampling_and_stop_strings(engine: Engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=7)
    full, done = run(engine, "acme/a@1", params)
    assert run(engine, "acme/a@1", params)[0] == full  # seedable
    assert len(full) > 12, full
    stop = full[8:12]
    cut, done = run(engine, "acme/a@1", SamplingParams(**{**params.__dict__, "stop": ("\x00never", stop)}))
    assert cut == full[: full.find(stop)]
    assert stop not in cut and done.finish_reason == "stop"
    assert done.completion_tokens < 40


def test_max_tokens_and_usage(engine: Engine) -> None:
    text, done = run(engine, None, SamplingParams(max_tokens=5, temperature=0))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    assert done.prompt_tokens == len(engine.encode_chat(MSGS))


def test_unknown_adapter_and_idempotent_load_unload(engine: Engine, adapters: dict[str, Path]) -> None:
    with pytest.raises(Exception, match="not loaded"):
        list(engine.generate(MSGS, "acme/nope@1", GREEDY))
    engine.load_adapter("acme/c@1", adapters["a"])
    engine.load_adapter("acme/c@1", adapters["b"])  # already loaded under that name: no-op
    assert run(engine, "acme/c@1", GREEDY)[0] == run(engine, "acme/a@1", GREEDY)[0]
    engine.unload_adapter("acme/c@1")
    engine.unload_adapter("acme/c@1")
    assert not engine.has_adapter("acme/c@1") and engine.has_adapter("acme/a@1")


def test_refuses_bin_only_and_wrong_shape(engine: Engine, tiny_model_path: str, tmp_path: Path,
                                          make_lora_adapter) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    binary = make_lora_adapter(tiny_model_path, tmp_path / "bin", 3, safetensors=False)
    assert not (binary / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterRejected, match="safetensors"):
        engine.load_adapter("acme/bin@1", binary)
    other = tmp_path / "other-base"  # same family, hidden 32 instead of 64
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    wrong = make_lora_adapter(str(other), tmp_path / "wrong", 4)
    with pytest.raises(AdapterRejected, match="does not fit"):
        engine.load_adapter("acme/wrong@1", wrong)
    assert not engine.has_adapter("acme/bin@1") and not engine.has_adapter("acme/wrong@1")
    assert run(engine, "acme/a@1", GREEDY)[1].completion_tokens > 0  # still serving


def test_one_at_a_time_engine_behind_tiers(tiny_model_path: str, adapters: dict[str, Path]) -> None:
    """The PEFT engine sits behind the same adapter tiers as the batched one (serving's one adapter cache):
    at most ``max_adapters`` loaded, the least recently used unloaded for a new one, a pinned adapter (a
    generation running) never, and answers equal to loading the adapter by hand."""
    from adapterfab.serve.tiers import AdapterTiers

    eng = Engine(tiny_model_path, torch_threads=1, max_adapters=1)
    folders = {"acme/a@1": adapters["a"], "acme/b@1": adapters["b"]}
    tiers = AdapterTiers(eng, lambda key: (folders[key], None, True))
    tiers.acquire("acme/a@1")
    want = run(eng, "acme/a@1", GREEDY)[0]
    assert eng.free_slots == 0 and eng.adapters == ["acme/a@1"]
    assert not tiers.evict("acme/a@1")  # pinned by a running request: stays
    tiers.release("acme/a@1")
    tiers.load("acme/b@1")  # the one slot: a is unloaded for b
    assert eng.adapters == ["acme/b@1"] and tiers.stats()["device_evictions"] == 1
    tiers.load("acme/a@1")  # back from the RAM tier (the checked folder), same answers
    assert eng.adapters == ["acme/a@1"] and tiers.stats()["cpu_hits"] == 1
    assert run(eng, "acme/a@1", GREEDY)[0] == want


def test_a_ram_tier_adapter_whose_folder_went_is_read_again(tiny_model_path: str, adapters: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """The one-at-a-time engine reads an adapter's folder again when it places it from the RAM tier; a
    replica sharing the cache folder may have removed that folder meanwhile (its trim, serve.backend.
    DiskCache). The adapter is fetched again and placed, not a 503 for PLACE_RETRY_S on every try."""
    import shutil

    from adapterfab.serve.tiers import AdapterTiers

    eng = Engine(tiny_model_path, torch_threads=1, max_adapters=1)
    fetched: list[str] = []

    def fetch(key: str) -> tuple[Path, None, bool]:  # the cache: a copy, downloaded again when missing
        fetched.append(key)
        dest = tmp_path / key.replace("/", "_")
        if not dest.exists():
            shutil.copytree(adapters[key[5]], dest)
        return dest, None, True

    tiers = AdapterTiers(eng, fetch)
    tiers.load("acme/a@1")
    want = run(eng, "acme/a@1", GREEDY)[0]
    tiers.load("acme/b@1")  # a goes to the RAM tier
    shutil.rmtree(tmp_path / "acme_a@1")  # another replica's trim removes its folder
    tiers.load("acme/a@1")
    assert eng.adapters == ["acme/a@1"] and fetched == ["acme/a@1", "acme/b@1", "acme/a@1"]
    assert run(eng, "acme/a@1", GREEDY)[0] == want


def test_detokenizer_never_emits_partial_utf8(engine: Engine) -> None:
    text = "Arr 🦜 matey, 世界 héllo ✨!"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(engine.tokenizer)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # multi-token characters were held back


def test_stop_matcher_across_deltas() -> None:
    m = StopMatcher(("END", "xyz"))
    out = [m.push(d) for d in ["hello E", "N", "ding", " and E", "ND more"]]
    assert "".join(out) == "hello ENding and " and m.stopped
    m2 = StopMatcher(("END",))
    assert m2.push("abc E") == "abc " and m2.flush() == "E"


def test_stop_matcher_holds_back_exactly_what_may_begin_a_stop_string() -> None:
    """The held-back tail (found from the stop strings' first characters) against the plain definition
    (the longest tail of the text that is a proper prefix of a stop string), on random text."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        m, text, sent = StopMatcher(stops), "", ""
        for _ in range(rng.randint(1, 12)):
            delta = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 3)))
            text += delta
            sent += m.push(delta)
            hit = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hit:
                assert m.stopped and sent == text[:min(hit)]
                break
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert sent == text[:len(text) - hold], (stops, text, sent)
