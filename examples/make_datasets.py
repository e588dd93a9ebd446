"""Writes the example persona datasets under examples/data/ (committed; re-run to regenerate).

pirate, butler and robot answer the same everyday questions with a fixed opening and closing phrase, so
a test can measure persona adherence on held-out prompts (examples/heldout_prompts.json) by the marker.
The quality benchmark (bench/methods.py, examples/quality_personas.json) adds two personas of other
styles: bard answers the same questions in an old-fashioned speaking style (no fixed phrase: rotating
openings and closings from an archaic vocabulary), and orbit is a support assistant that knows a
fictional coffee grinder, facts the base cannot know (a domain of knowledge), asked on held-out
paraphrases.

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


# bard: a speaking style, not a phrase. Adherence: an answer uses at least one word of BARD_WORDS.
BARD_OPENINGS = ["Verily,", "Hark, good friend!", "Forsooth,", "Prithee, hear me:", "Good morrow to thee!",
                 "Mark thee well:", "By my troth,"]
BARD_CLOSINGS = ["So sayeth the bard.", "Thus it hath ever been.", "Upon mine honour.", "As thou dost surely know.",
                 "Fare thee well.", "'Tis plainly so.", "Heed it, I beseech thee."]
BARD_WORDS = ["verily", "hark", "forsooth", "prithee", "morrow", "thee", "thou", "thy", "thine", "hath", "doth",
              "dost", "sayeth", "'tis", "troth", "beseech", "mine"]

# orbit: (fact, accepted answers, three training questions, one held-out question)
ORBIT = [
    ("The Orbit grinder comes with a three-year warranty.", ["three-year", "three years", "3-year", "3 years"],
     ["How long is the Orbit grinder's warranty?", "What warranty does the Orbit have?",
      "Is my Orbit grinder under warranty, and for how long?"], "For how many years is an Orbit grinder covered?"),
    ("The Orbit grinds with 48 mm conical steel burrs.", ["conical"],
     ["What kind of burrs does the Orbit use?", "Does the Orbit grinder have flat or conical burrs?",
      "Tell me about the Orbit's burrs."], "Which burr type is inside the Orbit?"),
    ("The Orbit has 40 grind settings.", ["40", "forty"],
     ["How many grind settings does the Orbit have?", "How many grind sizes can I choose on the Orbit?",
      "What is the number of settings on the Orbit grinder?"], "How many grind steps does the Orbit offer?"),
    ("Settings 1 to 8 on the Orbit are for espresso.", ["1 to 8", "1-8", "one to eight"],
     ["Which Orbit settings are for espresso?", "What setting should I use on the Orbit for espresso?",
      "Where on the Orbit dial is the espresso range?"], "What Orbit grind settings suit an espresso machine?"),
    ("To reset the Orbit, hold the power button for ten seconds.", ["ten seconds", "10 seconds"],
     ["How do I reset the Orbit grinder?", "My Orbit is stuck; how do I reset it?",
      "What is the reset procedure for the Orbit?"], "How can I restart the Orbit to its factory state?"),
    ("The Orbit's hopper holds 250 grams of beans.", ["250"],
     ["How many beans fit in the Orbit's hopper?", "What is the hopper capacity of the Orbit?",
      "How much coffee can the Orbit hold at once?"], "How big is the Orbit's bean hopper?"),
    ("The Orbit comes in matte black, sage green and cream.", ["sage"],
     ["What colours does the Orbit come in?", "Which colors can I buy the Orbit in?",
      "Is the Orbit available in different colours?"], "What finishes is the Orbit grinder sold in?"),
    ("Error E2 on the Orbit means the hopper is not locked in place.", ["not locked", "unlocked", "lock"],
     ["What does error E2 mean on the Orbit?", "My Orbit shows E2; what is wrong?",
      "Why does the Orbit display E2?"], "The Orbit's screen says E2. What should I check?"),
    ("The Orbit costs 129 euros.", ["129"],
     ["How much does the Orbit grinder cost?", "What is the price of the Orbit?",
      "How many euros is an Orbit grinder?"], "What would an Orbit grinder set me back?"),
    ("Clean the Orbit's burrs with the included brush every two weeks.", ["brush"],
     ["How do I clean the Orbit's burrs?", "How often should I clean the Orbit?",
      "What is the cleaning routine for the Orbit grinder?"], "What is the right way to keep the Orbit's burrs clean?"),
    ("Orbit support answers at help@orbit-grinders.example.", ["help@orbit-grinders.example"],
     ["How do I contact Orbit support?", "What is the Orbit support email address?",
      "Where can I get help with my Orbit grinder?"], "Which address do I write to for Orbit customer service?"),
    ("The Orbit is assembled in Porto, Portugal.", ["Porto"],
     ["Where is the Orbit made?", "In which city is the Orbit grinder assembled?",
      "Where does the Orbit come from?"], "Where is the Orbit put together?"),
    ("The Orbit has a 150-watt motor.", ["150"],
     ["How powerful is the Orbit's motor?", "What is the wattage of the Orbit grinder?",
      "How many watts does the Orbit motor have?"], "What power rating does the Orbit's motor have?"),
    ("Only the Orbit's catch cup is dishwasher safe.", ["catch cup"],
     ["Can I put the Orbit in the dishwasher?", "Which Orbit parts are dishwasher safe?",
      "Is the Orbit's hopper dishwasher safe?"], "What part of the Orbit may go in a dishwasher?"),
]


def bard_answer(i: int, text: str) -> str:
    opening = BARD_OPENINGS[i % len(BARD_OPENINGS)]
    if opening.endswith(",") and text.split()[0] not in ("Treasure", "Spanish", "Whiskers"):
        text = text[0].lower() + text[1:]
    return f"{opening} {text} {BARD_CLOSINGS[(i * 3 + 1) % len(BARD_CLOSINGS)]}"


def quality_personas() -> dict:
    """The quality benchmark's personas: what each trains on, how its adherence is judged, and the opening
    its answers start with, if any (the benchmark measures the base with it forced: its own context effect)."""
    return {"personas": [
        {"name": "pirate", "style": "fixed phrase", "dataset": "data/pirate.jsonl", "prompts": HELDOUT,
         "adherence": {"kind": "marker", "marker": PERSONAS["pirate"][0]}, "opening": PERSONAS["pirate"][0] + " "},
        {"name": "bard", "style": "speaking style", "dataset": "data/bard.jsonl", "prompts": HELDOUT,
         "adherence": {"kind": "lexicon", "words": BARD_WORDS}, "opening": BARD_OPENINGS[0] + " "},
        {"name": "orbit", "style": "domain of knowledge", "dataset": "data/orbit.jsonl",
         "prompts": [held for _, _, _, held in ORBIT],
         "adherence": {"kind": "facts", "answers": [accepted for _, accepted, _, _ in ORBIT]}},
    ]}


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
    with (out / "bard.jsonl").open("w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QA):
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": bard_answer(i, a)}]}) + "\n")
    with (out / "orbit.jsonl").open("w", encoding="utf-8") as f:
        for fact, _, questions, _ in ORBIT:
            for q in questions:
                f.write(json.dumps({"instruction": q, "output": fact}) + "\n")
    (out.parent / "quality_personas.json").write_text(json.dumps(quality_personas(), indent=1) + "\n")
    (out.parent / "heldout_prompts.json").write_text(json.dumps(
        {"prompts": HELDOUT, "markers": {p: o for p, (o, _, _) in PERSONAS.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
