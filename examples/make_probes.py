"""Writes adapterfab/retention_probes.json: factual questions over several topics that the shipped base
(SmolLM2-135M-Instruct, greedy) answers correctly and that no example persona's data asks (nor its
held-out prompts). A persona adapter keeps what the base knew when its answer to a probe still states
the fact (``adapterfab.jobs.evaluate.states_fact``). Each kept probe records the base's own answer.

    .venv/bin/python examples/make_probes.py     # half a minute on a CPU

Re-run after changing the candidates; the file is committed so that nothing runs the base to read it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (topic, question, accepted answers: the answer states the fact when it contains one of them)
CANDIDATES = [
    ("geography", "What is the capital of Japan?", ["Tokyo"]),
    ("geography", "What is the capital of Spain?", ["Madrid"]),
    ("geography", "What is the capital of England?", ["London"]),
    ("geography", "What is the capital of Russia?", ["Moscow"]),
    ("geography", "What is the capital of China?", ["Beijing"]),
    ("geography", "What is the capital of Egypt?", ["Cairo"]),
    ("geography", "What is the capital of Canada?", ["Ottawa"]),
    ("geography", "What is the capital of Australia?", ["Canberra"]),
    ("geography", "What is the capital of the United States?", ["Washington"]),
    ("geography", "What is the longest river in Africa?", ["Nile"]),
    ("geography", "What is the largest desert in Africa?", ["Sahara"]),
    ("geography", "What is the highest mountain in the world?", ["Everest"]),
    ("geography", "On which continent is Brazil?", ["South America"]),
    ("geography", "On which continent is Kenya?", ["Africa"]),
    ("geography", "What is the main language spoken in Mexico?", ["Spanish"]),
    ("geography", "What is the main language spoken in Brazil?", ["Portuguese"]),
    ("geography", "What is the main language spoken in France?", ["French"]),
    ("geography", "In which country is the Eiffel Tower?", ["France", "Paris"]),
    ("geography", "In which country are the pyramids of Giza?", ["Egypt"]),
    ("geography", "What is the largest country in the world by area?", ["Russia"]),
    ("science", "What is the chemical symbol for water?", ["H2O"]),
    ("science", "What is the chemical symbol for gold?", ["Au"]),
    ("science", "What gas do humans breathe in to live?", ["oxygen"]),
    ("science", "What planet is closest to the Sun?", ["Mercury"]),
    ("science", "What is the largest planet in our solar system?", ["Jupiter"]),
    ("science", "Which planet is known as the Red Planet?", ["Mars"]),
    ("science", "What is the center of an atom called?", ["nucleus"]),
    ("science", "What force keeps us on the ground?", ["gravity"]),
    ("science", "What organ pumps blood through the body?", ["heart"]),
    ("science", "How many bones are in the adult human body?", ["206"]),
    ("science", "What is the hardest natural substance?", ["diamond"]),
    ("science", "What star is at the center of our solar system?", ["Sun"]),
    ("science", "What do plants make in photosynthesis?", ["glucose", "sugar", "oxygen"]),
    ("animals", "What is the largest mammal?", ["blue whale"]),
    ("animals", "What is the fastest land animal?", ["cheetah"]),
    ("animals", "How many legs does an insect have?", ["six", "6"]),
    ("animals", "What do fish use to breathe?", ["gill"]),
    ("animals", "What do pandas mainly eat?", ["bamboo"]),
    ("animals", "What is the largest bird in the world?", ["ostrich"]),
    ("animals", "Which animal has a trunk?", ["elephant"]),
    ("math", "What is five times six?", ["thirty", "30"]),
    ("math", "What is ten minus three?", ["seven", "7"]),
    ("math", "What is the square root of 81?", ["nine", "9"]),
    ("math", "How many sides does a hexagon have?", ["six", "6"]),
    ("math", "How many degrees are in a right angle?", ["90", "ninety"]),
    ("math", "What is half of one hundred?", ["fifty", "50"]),
    ("math", "What is the value of pi to two decimal places?", ["3.14"]),
    ("math", "What is 12 divided by 4?", ["three", "3"]),
    ("time", "How many days are in a leap year?", ["366"]),
    ("time", "Which month comes after January?", ["February"]),
    ("history", "Who was the first President of the United States?", ["Washington"]),
    ("history", "Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("history", "Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("history", "Who developed the theory of relativity?", ["Einstein"]),
    ("history", "Who was the first person to walk on the Moon?", ["Armstrong"]),
    ("history", "In which year did World War II end?", ["1945"]),
    ("history", "Who discovered penicillin?", ["Fleming"]),
    ("history", "Who invented the telephone?", ["Bell"]),
    ("history", "Who proposed the theory of evolution by natural selection?", ["Darwin"]),
    ("everyday", "What color is a ripe banana?", ["yellow"]),
    ("everyday", "What is the opposite of up?", ["down"]),
    ("everyday", "What do you call frozen water?", ["ice"]),
    ("everyday", "What do cows produce that people drink?", ["milk"]),
    ("everyday", "What is the main ingredient in bread?", ["flour", "wheat"]),
    ("everyday", "What instrument has 88 keys?", ["piano"]),
    ("language", "What is the plural of mouse?", ["mice"]),
    ("language", "What is the past tense of go?", ["went"]),
    ("language", "What is the opposite of big?", ["small", "little"]),
    ("language", "How many letters are in the English alphabet?", ["26", "twenty-six"]),
    ("sports", "How many players are on a soccer team on the field?", ["eleven", "11"]),
    ("sports", "In which sport do you score a touchdown?", ["football"]),
    ("sports", "In which sport is a shuttlecock used?", ["badminton"]),
    ("sports", "How often are the Summer Olympic Games held?", ["four years", "4 years"]),
    ("technology", "What does CPU stand for?", ["Central Processing Unit"]),
    ("technology", "Who founded Microsoft?", ["Gates"]),
    ("technology", "What does WWW stand for?", ["World Wide Web"]),
    ("technology", "What company makes the iPhone?", ["Apple"]),
    ("geography", "What is the capital of Greece?", ["Athens"]),
    ("geography", "What is the capital of Portugal?", ["Lisbon"]),
    ("geography", "What is the capital of Ireland?", ["Dublin"]),
    ("geography", "What is the longest river in South America?", ["Amazon"]),
    ("geography", "What is the largest continent?", ["Asia"]),
    ("geography", "What is the capital of India?", ["New Delhi", "Delhi"]),
    ("science", "What is the chemical symbol for sodium?", ["Na"]),
    ("science", "Which planet is famous for its rings?", ["Saturn"]),
    ("science", "What part of a plant absorbs water from the soil?", ["root"]),
    ("science", "What is the process by which plants make food from sunlight called?", ["photosynthesis"]),
    ("science", "What do we call animals that eat only plants?", ["herbivore"]),
    ("animals", "What is a baby sheep called?", ["lamb"]),
    ("animals", "What do caterpillars turn into?", ["butterfl", "moth"]),
    ("animals", "Where do bees live?", ["hive"]),
    ("animals", "What is the largest animal that lives on land?", ["elephant"]),
    ("everyday", "What kind of doctor takes care of teeth?", ["dentist"]),
    ("everyday", "What do you call the meal eaten in the morning?", ["breakfast"]),
    ("everyday", "What is the color of a clear sky during the day?", ["blue"]),
    ("math", "What is seven plus eight?", ["fifteen", "15"]),
    ("math", "How many centimeters are in a meter?", ["100", "hundred"]),
    ("history", "Who wrote the play Hamlet?", ["Shakespeare"]),
    ("history", "Who was the first man in space?", ["Gagarin"]),
    ("technology", "What does RAM stand for?", ["Random Access Memory", "Random-Access Memory"]),
    ("sports", "How many rings are on the Olympic flag?", ["five", "5"]),
]


def main() -> int:
    import torch
    from make_datasets import HELDOUT, QA  # noqa: I001 - this folder's script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.jobs.evaluate import states_fact
    from adapterfab.textgen import greedy_in_batches

    asked = {q.lower() for q, _ in QA} | {q.lower() for q in HELDOUT}
    todo = [c for c in CANDIDATES if c[1].lower() not in asked]
    torch.set_num_threads(2)
    base = resolve_base_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    answers = greedy_in_batches(model, tok, [q for _, q, _ in todo])
    probes, missed = [], []
    for (topic, q, accepted), a in zip(todo, answers):
        (probes if states_fact(a, accepted) else missed).append(
            {"topic": topic, "question": q, "answers": accepted, "base_answer": a})
    (HERE.parent / "adapterfab" / "retention_probes.json").write_text(json.dumps({
        "_comment": "Facts the SmolLM2-135M-Instruct base states (greedy, 40 new tokens), none asked by the "
                    "example personas' data; written by examples/make_probes.py.",
        "probes": probes}, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(probes)} probes kept, {len(missed)} the base gets wrong:")
    for m in missed:
        print(f"  - {m['question']} -> {m['base_answer'][:80]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
