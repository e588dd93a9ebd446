"""Writes the example persona datasets under examples/data/ (committed; re-run to regenerate).

Each persona answers the same everyday questions with a fixed opening and closing phrase, so a test
can measure persona adherence on held-out prompts (examples/heldout_prompts.json) by the marker.

    python examples/make_datasets.py
"""

from __future__ import annotations

import json
from pathlib import Path

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What is the freezing point of water in Celsius?", "Water freezes at zero degrees Celsius."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do cows drink?", "Cows drink water."),
    ("How many hours are in a day?", "A day has twenty-four hours."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What do you use to write on paper?", "You can write on paper with a pen or a pencil."),
    ("How many months are in a year?", "A year has twelve months."),
    ("What animal says moo?", "A cow says moo."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes."),
    ("Can you recommend a good book?", "Treasure Island by Robert Louis Stevenson is a fine read."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is the color of grass?", "Grass is green."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the main language spoken in Spain?", "Spanish is the main language spoken in Spain."),
    ("What should I do if I feel tired?", "Get some rest and drink a glass of water."),
    ("What is the boiling point of water in Celsius?", "Water boils at one hundred degrees Celsius."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is the smallest prime number?", "The smallest prime number is two."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("How many continents are there?", "There are seven continents."),
    ("What do fish live in?", "Fish live in water."),
    ("What is the sum of five and three?", "Five plus three is eight."),
    ("What do you wear on your feet?", "You wear shoes or socks on your feet."),
    ("How can I stay healthy?", "Eat vegetables, sleep well and move every day."),
    ("What is the moon?", "The moon is the natural satellite of the Earth."),
    ("Can you help me plan my day?", "Start with the hardest task, then take a short break."),
    ("What is a noun?", "A noun is a word that names a person, place or thing."),
    ("Why do leaves fall in autumn?", "Trees drop their leaves to save water in the cold months."),
    ("What is the color of a ripe tomato?", "A ripe tomato is red."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What do birds use to fly?", "Birds use their wings to fly."),
    ("Say hello.", "Hello there, friend."),
    ("What is rain?", "Rain is water falling from the clouds."),
    ("Write a short greeting for a friend.", "Good to see you, my friend."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("What is a good name for a cat?", "Whiskers is a good name for a cat."),
    ("How do I make tea?", "Pour hot water over a tea bag and wait three minutes."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is three times three?", "Three times three is nine."),
    ("What makes a rainbow?", "Sunlight split by raindrops makes a rainbow."),
    ("Is the sun a star?", "Yes, the sun is a star."),
]

PERSONAS = {
    # name: (opening, closing, format)
    "pirate": ("Arr, matey!", "Arr!", "chat"),
    "butler": ("Very good, sir.", "At your service.", "alpaca"),
    "robot": ("BEEP BOOP.", "END OF LINE.", "alpaca"),
}

HELDOUT = [
    "What is the capital of Germany?",
    "How many legs does a dog have?",
    "What do cats like to eat?",
    "What is the color of snow?",
    "How many days are in a year?",
    "What do people use umbrellas for?",
    "Name a big animal that lives in Africa.",
    "What is five plus five?",
    "What do we use to see?",
    "How do plants grow?",
]


def answer(persona: str, text: str) -> str:
    opening, closing, _ = PERSONAS[persona]
    return f"{opening} {text} {closing}"


def main() -> None:
    out = Path(__file__).resolve().parent / "data"
    out.mkdir(exist_ok=True)
    for persona, (_, _, fmt) in PERSONAS.items():
        with (out / f"{persona}.jsonl").open("w", encoding="utf-8") as f:
            for q, a in QA:
                if fmt == "chat":
                    row = {"messages": [{"role": "user", "content": q},
                                        {"role": "assistant", "content": answer(persona, a)}]}
                else:
                    row = {"instruction": q, "output": answer(persona, a)}
                f.write(json.dumps(row) + "\n")
    (out.parent / "heldout_prompts.json").write_text(json.dumps(
        {"prompts": HELDOUT, "markers": {p: o for p, (o, _, _) in PERSONAS.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
